#!/usr/bin/env bash
# A real Kubernetes API server on this machine, for the tests and by hand:
#   scripts/kube-local.sh build   builds etcd, kube-apiserver, kube-controller-manager and kubectl
#                                 (the same release, so no version skew) from the Go module proxy
#                                 into a cache outside the clone, once per version (later runs
#                                 reuse it)
#   scripts/kube-local.sh up      builds if needed, then starts etcd, kube-apiserver and
#                                 kube-controller-manager on loopback: client-certificate
#                                 authentication (the admin is in system:masters), ServiceAccount
#                                 tokens signed and reviewable (TokenRequest, TokenReview), the Node
#                                 and RBAC authorizers, the built-in controllers (namespaces,
#                                 ServiceAccounts, Deployments, DaemonSets, garbage collection);
#                                 writes build/kube/kubeconfig. No scheduler and no kubelet: pods
#                                 are created but never bound or run.
#   scripts/kube-local.sh restart-apiserver
#                                 stops kube-apiserver and starts it again (etcd and its data stay)
#   scripts/kube-local.sh down    stops them (by the PIDs it recorded) and removes build/kube
#   scripts/kube-local.sh env     prints `export KUBECONFIG=...` and the kubectl to use
# Versions: NODEMESH_K8S_VERSION (default v1.37.2; its k8s.io/* staging modules at the matching
# v0.x), NODEMESH_ETCD_VERSION (default v3.6.16). Cache: NODEMESH_TOOLS_CACHE (default
# /var/cache/nodemesh). Ports: NODEMESH_KUBE_PORT (default 16443), etcd on the next two up from
# NODEMESH_ETCD_PORT (default 16379), the controller manager's on the API server's + 1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { printf '» %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

K8S_VERSION=${NODEMESH_K8S_VERSION:-v1.37.2}
ETCD_VERSION=${NODEMESH_ETCD_VERSION:-v3.6.16}
CACHE=${NODEMESH_TOOLS_CACHE:-/var/cache/nodemesh}
API_PORT=${NODEMESH_KUBE_PORT:-16443}
ETCD_PORT=${NODEMESH_ETCD_PORT:-16379}
STATE="$ROOT/build/kube"
APISERVER="$CACHE/kubernetes-$K8S_VERSION/kube-apiserver"
KUBECTL="$CACHE/kubernetes-$K8S_VERSION/kubectl"
CONTROLLERS="$CACHE/kubernetes-$K8S_VERSION/kube-controller-manager"
ETCD="$CACHE/etcd-$ETCD_VERSION/etcd"

need_go() {
  command -v go >/dev/null || die "go is not installed: it builds etcd and kube-apiserver from the Go module proxy"
}

# The staging modules' version that goes with a kubernetes release: v1.37.2 -> v0.37.2.
staging_version() { printf 'v0.%s' "${K8S_VERSION#v1.}"; }

build_kubernetes() {
  [[ -x $APISERVER && -x $KUBECTL && -x $CONTROLLERS ]] && return 0
  need_go
  local work gomod started
  started=$(date +%s)
  work=$(mktemp -d)
  say "building kube-apiserver, kube-controller-manager and kubectl $K8S_VERSION (once; cached in $(dirname "$APISERVER"))"
  gomod=$(cd "$work" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])') \
    || die "k8s.io/kubernetes@$K8S_VERSION is not served by the Go module proxy"
  # k8s.io/kubernetes points its staging modules at folders of its own repository; as a module
  # they come from the proxy at the matching v0.x instead.
  {
    printf 'module nodemesh.local/kube-build\n\ngo 1.26.0\n\nrequire k8s.io/kubernetes %s\n\n' "$K8S_VERSION"
    grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$gomod" | awk -v v="$(staging_version)" '{print "replace " $1 " => " $1 " " v}'
  } >"$work/go.mod"
  (
    cd "$work"
    go get "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION" "k8s.io/kubernetes/cmd/kube-controller-manager@$K8S_VERSION" "k8s.io/kubernetes/cmd/kubectl@$K8S_VERSION" >&2
    local pkg=k8s.io/component-base/version
    mkdir -p "$work/bin"
    CGO_ENABLED=0 go build -trimpath \
      -ldflags "-s -w -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2)" \
      -o "$work/bin/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubectl >&2
  ) || die "building kube-apiserver, kube-controller-manager and kubectl failed (see above)"
  mkdir -p "$(dirname "$APISERVER")"
  mv "$work/bin/kubectl" "$KUBECTL"
  mv "$work/bin/kube-controller-manager" "$CONTROLLERS"
  mv "$work/bin/kube-apiserver" "$APISERVER"
  rm -rf "$work"
  say "kube-apiserver, kube-controller-manager and kubectl built in $(($(date +%s) - started)) s"
}

build_etcd() {
  [[ -x $ETCD ]] && return 0
  need_go
  local work started
  started=$(date +%s)
  work=$(mktemp -d)
  say "building etcd $ETCD_VERSION (once; cached in $(dirname "$ETCD"))"
  # The server module points its siblings at folders of its repository: from the proxy instead.
  cat >"$work/go.mod" <<EOF
module nodemesh.local/etcd-build

go 1.26.0

require go.etcd.io/etcd/server/v3 $ETCD_VERSION

replace (
	go.etcd.io/etcd/api/v3 => go.etcd.io/etcd/api/v3 $ETCD_VERSION
	go.etcd.io/etcd/client/pkg/v3 => go.etcd.io/etcd/client/pkg/v3 $ETCD_VERSION
	go.etcd.io/etcd/client/v3 => go.etcd.io/etcd/client/v3 $ETCD_VERSION
	go.etcd.io/etcd/pkg/v3 => go.etcd.io/etcd/pkg/v3 $ETCD_VERSION
)
EOF
  cat >"$work/main.go" <<'EOF'
// etcd as its own release runs it.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
  (cd "$work" && go mod tidy >&2 && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$work/etcd" . >&2) || die "building etcd failed (see above)"
  mkdir -p "$(dirname "$ETCD")"
  mv "$work/etcd" "$ETCD"
  rm -rf "$work"
  say "etcd built in $(($(date +%s) - started)) s"
}

# A certificate signed by the cluster CA: name, subject, extensions (openssl -addext syntax).
issue() {
  local name=$1 subject=$2 ext=$3
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$STATE/pki/$name.key" -subj "$subject" -out "$STATE/pki/$name.csr" 2>/dev/null
  openssl x509 -req -in "$STATE/pki/$name.csr" -CA "$STATE/pki/ca.crt" -CAkey "$STATE/pki/ca.key" -CAcreateserial -days 30 \
    -extfile <(printf '%s\n' "$ext") -out "$STATE/pki/$name.crt" 2>/dev/null
  rm -f "$STATE/pki/$name.csr"
}

pki() {
  mkdir -p "$STATE/pki"
  chmod 700 "$STATE/pki"
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$STATE/pki/ca.key" -subj "/CN=nodemesh-local-kubernetes-ca" -days 30 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$STATE/pki/ca.crt" 2>/dev/null
  issue apiserver "/CN=kube-apiserver" "$(printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:10.0.0.1')"
  issue admin "/O=system:masters/CN=nodemesh-admin" "$(printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth')"
  openssl ecparam -name prime256v1 -genkey -noout -out "$STATE/pki/sa.key" 2>/dev/null
  openssl ec -in "$STATE/pki/sa.key" -pubout -out "$STATE/pki/sa.pub" 2>/dev/null
}

b64() { base64 -w0 <"$1"; }

kubeconfig() {
  cat >"$STATE/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $(b64 "$STATE/pki/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(b64 "$STATE/pki/admin.crt")
    client-key-data: $(b64 "$STATE/pki/admin.key")
contexts:
- name: local
  context: {cluster: local, user: admin}
current-context: local
EOF
  chmod 600 "$STATE/kubeconfig"
}

running() { [[ -f $STATE/$1.pid ]] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

start_apiserver() {
  say "kube-apiserver on 127.0.0.1:$API_PORT"
  "$APISERVER" --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" \
    --tls-cert-file "$STATE/pki/apiserver.crt" --tls-private-key-file "$STATE/pki/apiserver.key" \
    --client-ca-file "$STATE/pki/ca.crt" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$STATE/pki/sa.pub" --service-account-signing-key-file "$STATE/pki/sa.key" \
    --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction --endpoint-reconciler-type none \
    --service-cluster-ip-range 10.0.0.0/24 --allow-privileged=true --cert-dir "$STATE/pki" \
    >>"$STATE/kube-apiserver.log" 2>&1 </dev/null &
  echo $! >"$STATE/kube-apiserver.pid"
}

up() {
  build_etcd
  build_kubernetes
  if running kube-apiserver; then
    say "already up: $STATE/kubeconfig"
    return 0
  fi
  down quiet
  mkdir -p "$STATE"
  pki
  say "etcd on 127.0.0.1:$ETCD_PORT"
  "$ETCD" --name local --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-cluster "local=http://127.0.0.1:$((ETCD_PORT + 1))" --log-level warn \
    >"$STATE/etcd.log" 2>&1 </dev/null &
  echo $! >"$STATE/etcd.pid"
  start_apiserver
  kubeconfig
  wait_ready
  controllers
}

wait_ready() {
  local i
  for i in $(seq 1 300); do
    if curl -sf --cacert "$STATE/pki/ca.crt" --cert "$STATE/pki/admin.crt" --key "$STATE/pki/admin.key" "https://127.0.0.1:$API_PORT/readyz" >/dev/null 2>&1; then
      say "ready after $((i / 5)) s: export KUBECONFIG=$STATE/kubeconfig"
      return 0
    fi
    running kube-apiserver || { tail -20 "$STATE/kube-apiserver.log" >&2; down quiet; die "kube-apiserver exited (log above)"; }
    sleep 0.2
  done
  tail -20 "$STATE/kube-apiserver.log" >&2
  down quiet
  die "kube-apiserver was not ready within 60 s (log above)"
}

# The API server alone goes away and comes back (etcd and its data stay): what clients see when
# a control plane node restarts. Its watch cache starts again at etcd's current revision.
restart_apiserver() {
  running kube-apiserver || die "not up: scripts/kube-local.sh up first"
  stop_pid kube-apiserver
  say "kube-apiserver stopped; starting it again"
  start_apiserver
  wait_ready
}

stop_pid() {
  local pid
  [[ -f $STATE/$1.pid ]] || return 0
  pid=$(cat "$STATE/$1.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  return 0
}

# The built-in controllers, as the admin (system:masters): no per-controller credentials here.
controllers() {
  say "kube-controller-manager on 127.0.0.1:$((API_PORT + 1))"
  "$CONTROLLERS" --kubeconfig "$STATE/kubeconfig" --leader-elect=false \
    --bind-address 127.0.0.1 --secure-port "$((API_PORT + 1))" --cert-dir "$STATE/pki" \
    --root-ca-file "$STATE/pki/ca.crt" --service-account-private-key-file "$STATE/pki/sa.key" \
    --use-service-account-credentials=false --controllers '*' \
    >"$STATE/kube-controller-manager.log" 2>&1 </dev/null &
  echo $! >"$STATE/kube-controller-manager.pid"
}

down() {
  local name
  for name in kube-controller-manager kube-apiserver etcd; do stop_pid "$name"; done
  rm -rf "$STATE"
  [[ ${1:-} == quiet ]] || say "stopped; $STATE removed"
}

case "${1:-}" in
  build) build_etcd; build_kubernetes ;;
  up) up ;;
  restart-apiserver) restart_apiserver ;;
  down) down ;;
  env) printf 'export KUBECONFIG=%s\nalias kubectl=%s\n' "$STATE/kubeconfig" "$KUBECTL" ;;
  *) die "usage: scripts/kube-local.sh build|up|restart-apiserver|down|env" ;;
esac
