#!/usr/bin/env bash
# nodemesh's image without a registry (none is reachable here):
#   scripts/image.sh base    a Debian 13 base made with debootstrap from Debian's archive, imported
#                            as localhost/nodemesh-base:trixie (once; NODEMESH_TOOLS_CACHE)
#   scripts/image.sh build   daemonset/Dockerfile built with buildah on that base, pinned by its
#                            digest: localhost/nodemesh:<package version>
#   scripts/image.sh prove   runs the image's agent against this machine's kernel with the
#                            DaemonSet's host mounts, and checks that it enrolls a local pod
# Needs root, and debootstrap and buildah (Debian packages; installed when missing).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
say() { printf '» %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

CACHE=${NODEMESH_TOOLS_CACHE:-/var/cache/nodemesh}/image
SUITE=trixie
# -slim: the base keeps no package cache, documentation, man pages or translations (below).
BASE=localhost/nodemesh-base:$SUITE-slim
VERSION=$(node -p "require('./package.json').version")
IMAGE=localhost/nodemesh:$VERSION

need() {
  local missing=() p
  for p in "$@"; do command -v "$p" >/dev/null || missing+=("$p"); done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  say "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
}

base() {
  need debootstrap buildah
  if buildah inspect --type image "$BASE" >/dev/null 2>&1; then return 0; fi
  mkdir -p "$CACHE"
  local rootfs="$CACHE/rootfs-$SUITE"
  if [[ ! -x $rootfs/bin/sh ]]; then
    say "debootstrap --variant=minbase $SUITE from deb.debian.org"
    rm -rf "$rootfs"
    debootstrap --variant=minbase "$SUITE" "$rootfs" http://deb.debian.org/debian >&2 || die "debootstrap failed"
  fi
  say "importing the base as $BASE"
  local ctr mnt
  ctr=$(buildah from scratch)
  buildah copy --quiet "$ctr" "$rootfs" / >/dev/null
  # As Debian's own slim images: debootstrap's downloaded packages and lists go, and dpkg keeps no
  # documentation, man pages or translations of what is installed now or later (copyrights stay).
  mnt=$(buildah mount "$ctr")
  rm -rf "$mnt"/var/cache/apt/archives/*.deb "$mnt"/var/cache/apt/*.bin "$mnt"/var/lib/apt/lists/* "$mnt"/var/log/*.log
  cat > "$mnt/etc/dpkg/dpkg.cfg.d/nodemesh-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
CFG
  find "$mnt/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
  find "$mnt/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$mnt"/usr/share/man/* "$mnt"/usr/share/info/* "$mnt"/usr/share/locale/* "$mnt"/usr/share/lintian/*
  buildah umount "$ctr" >/dev/null
  buildah config --cmd /bin/sh "$ctr"
  buildah commit --quiet "$ctr" "$BASE" >/dev/null
  buildah rm "$ctr" >/dev/null
}

digest() { buildah inspect --type image --format '{{.FromImageDigest}}' "$1"; }

build() {
  base
  local d
  d=$(digest "$BASE")
  say "building $IMAGE on $BASE@$d"
  # chroot isolation: this machine's cgroups are hybrid (v1 and v2), which crun refuses.
  # The host's CA bundle is the build's (a registry reached through a proxy with its own CA).
  buildah bud --isolation chroot --network host --layers \
    -v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro --build-arg NODE_EXTRA_CA_CERTS=/run/host-ca.crt --build-arg SSL_CERT_FILE=/run/host-ca.crt \
    -f daemonset/Dockerfile --build-arg "BASE=localhost/nodemesh-base@$d" -t "$IMAGE" . >&2
  say "$IMAGE: $(buildah inspect --type image --format '{{.FromImageDigest}}' "$IMAGE")"
}

# The image's agent on this machine's kernel, with what the DaemonSet gives it: the host's
# network and PID namespaces, /sys (bpffs, cgroup2), /proc, the run folder, and only the
# capabilities 06-agent.yaml adds (BPF, PERFMON, NET_ADMIN, SYS_ADMIN, SYS_PTRACE, NET_RAW; not
# privileged). Neither podman nor buildah can run a container here (crun refuses this machine's
# hybrid cgroup layout; runc and buildah's chroot isolation cannot set the container's rlimits or
# keep a bind mount over the read-only /sys), so the image's root filesystem is entered with
# chroot in a mount namespace of its own, and setpriv bounds the capabilities.
prove_cleanup() {
  if [[ -n $pid ]]; then
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  NODEMESH_STATE_DIR=$state node bin/nodemesh.js pod rm web >/dev/null 2>&1 || true
  NODEMESH_STATE_DIR=$state node bin/nodemesh.js cleanup --node "$node" --bpf-root "$pins" >/dev/null 2>&1 || true
  buildah umount "$ctr" >/dev/null 2>&1 || true
  buildah rm "$ctr" >/dev/null 2>&1 || true
  rm -rf "$config" "$state"
}

prove() {
  need buildah
  buildah inspect --type image "$IMAGE" >/dev/null 2>&1 || build
  # Globals: the EXIT trap runs after this function has returned.
  state=/run/nodemesh-imageproof node=imageproof pid="" ok=1
  pins=/sys/fs/bpf/nodemesh-$node
  config=$(mktemp -d)
  ctr=$(buildah from --name "nodemesh-imageproof-$$" "$IMAGE")
  root=$(buildah mount "$ctr")
  trap prove_cleanup EXIT
  cat >"$config/web.yaml" <<YAML
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIPs: [10.96.0.99]
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
YAML
  say "a local pod (the host's runtime): default/web, an echo server on 8080"
  NODEMESH_STATE_DIR=$state node bin/nodemesh.js pod run --name web --node "$node" --label app=web --detach -- node bin/nodemesh.js debug echo-server --port 8080 >&2
  mkdir -p "$root/run/netns" "$root$state" "$root/config"
  say "the agent from $IMAGE ($(buildah run --isolation chroot "$ctr" -- /usr/bin/node --version 2>/dev/null || echo node))"
  unshare -m --propagation slave sh -ec '
    root=$1 state=$2 config=$3 node=$4 pins=$5
    mount -t proc proc "$root/proc"
    mount --rbind /sys "$root/sys"
    mount --rbind /dev "$root/dev"
    mount --rbind /run/netns "$root/run/netns"
    mount --bind "$state" "$root$state"
    mount --bind "$config" "$root/config"
    exec chroot "$root" /usr/bin/setpriv --bounding-set=-all,+bpf,+perfmon,+net_admin,+sys_admin,+sys_ptrace,+net_raw --inh-caps=-all -- \
      /usr/bin/env NODEMESH_STATE_DIR="$state" NODEMESH_LOG_LEVEL=info \
      /usr/bin/node /opt/nodemesh/bin/nodemesh.js agent --config-dir /config --node "$node" --bpf-root "$pins" \
      --metrics 127.0.0.1:25020 --ready 127.0.0.1:25021 --admin 127.0.0.1:25000
  ' sh "$root" "$state" "$config" "$node" "$pins" >"$config/agent.log" 2>&1 &
  pid=$!
  local i cg netns dial
  for i in $(seq 1 100); do
    curl -sf -o /dev/null 127.0.0.1:25021/healthz/ready && break
    kill -0 "$pid" 2>/dev/null || { cat "$config/agent.log" >&2; die "the image's agent exited"; }
    sleep 0.2
  done
  curl -s 127.0.0.1:25000/pods | node -e 'const p=JSON.parse(require("fs").readFileSync(0,"utf8")).pods; for (const x of p) console.error(`» enrolled ${x.namespace}/${x.name} ${x.ip4} verified=${x.verified}`); process.exit(p.some((x)=>x.name==="web"&&x.verified)?0:1)' || ok=0
  # A connection from inside the pod to the Service address (no route to it exists in the pod):
  # served only if the image's proxy captured it.
  cg=$(NODEMESH_STATE_DIR=$state node -e 'const fs=require("fs"),p=process.env.NODEMESH_STATE_DIR+"/pods";for(const f of fs.readdirSync(p).filter((f)=>f.endsWith(".json"))){const r=JSON.parse(fs.readFileSync(p+"/"+f));if(r.name==="web")console.log(r.cgroupPath+" "+r.netns)}')
  netns=${cg#* }; cg=${cg% *}
  dial=$(sh -c 'echo $$ > "$0/cgroup.procs" && exec ip netns exec "$1" node bin/nodemesh.js debug dial 10.96.0.99 80 --bytes 4096' "$cg" "$netns" | tail -1)
  say "pod -> Service 10.96.0.99:80 through the image's proxy: $dial"
  [[ $dial == *'"intact":true'* ]] || ok=0
  [[ $ok -eq 1 ]] || { cat "$config/agent.log" >&2; die "the image's agent did not enroll and serve the pod"; }
  say "proved: the image's agent enrolled, verified and served a local pod with the DaemonSet's capabilities"
}

case "${1:-}" in
  base) base ;;
  build) build ;;
  prove) prove ;;
  *) die "usage: scripts/image.sh base|build|prove" ;;
esac
