/**
 * The local pod runtime (design.md section 7): a pod is a network namespace joined by a veth to
 * a host bridge, a cgroup under nodemesh's cgroup v2 subtree, and a process in both. Local pods
 * get a route to the pod subnet only, so traffic that capture misses fails with ENETUNREACH
 * instead of leaving the machine. Creation is all or nothing; removal removes exactly what the
 * record names.
 */
import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { createHash, randomUUID } from 'node:crypto';
import { closeSync, openSync } from 'node:fs';
import { dirname, join } from 'node:path';

import { NodemeshError, isNodemeshError } from '../shared/errors.js';
import { logger } from '../shared/log.js';
import { isAlive } from '../shared/process.js';
import { createCgroup, findCgroup2Mount, removeCgroup, stopCgroupProcesses, waitForCgroupMember } from './cgroup.js';
import { hostAddress, nodeCgroup, podCapacity, type RuntimeConfig } from './config.js';
import { bestEffort, CommandFailed, ip, resolveExecutable } from '../shared/exec.js';
import type { PodSpec } from './pod-spec.js';
import { DEFAULT_ENROLL_TIMEOUT_MS, agentRunDir, drainPod, handOverPod, type EnrollPod, type HandOver } from './enrollment.js';
import { PodStore, type PodRecord } from './store.js';

const log = logger('runtime');

/** Which parts of a pod a create() call made, so a failed create undoes exactly those. */
interface Made {
  netns: boolean;
  veth: boolean;
  cgroup: boolean;
}

const EVERYTHING: Readonly<Made> = { netns: true, veth: true, cgroup: true };

/** A container runtime's default capability set (what a Kubernetes pod gets without securityContext). */
const POD_CAPABILITIES = ['chown', 'dac_override', 'fowner', 'fsetid', 'kill', 'setgid', 'setuid', 'setpcap', 'net_bind_service', 'net_raw', 'sys_chroot', 'mknod', 'audit_write', 'setfcap']
  .map((c) => `+${c}`)
  .join(',');

export interface StartOptions {
  /** How long the node agent may take to capture the pod (default 30 s). */
  readonly enrollTimeoutMs?: number;
  /** Called with a line for humans before a step that can take a while. */
  readonly progress?: (step: string) => void;
}

function enrollPod(r: PodRecord): EnrollPod {
  return { uid: r.uid, name: r.name, namespace: r.namespace, serviceAccount: r.serviceAccount, labels: r.labels, ip4: r.ip4, ip6: r.ip6, netnsPath: r.netnsPath, cgroupPath: r.cgroupPath };
}

export interface PodStatus extends PodRecord {
  readonly state: 'running' | 'exited' | 'creating';
}

export class LocalPodRuntime {
  readonly store: PodStore;

  constructor(readonly config: RuntimeConfig) {
    this.store = new PodStore(config.stateDir);
  }

  /** The cgroup of all pods of a node (the node agent's gate sits on it). */
  private async nodeCgroup(node: string): Promise<string> {
    return nodeCgroup(await findCgroup2Mount(), this.config, node);
  }

  private names(spec: Pick<PodSpec, 'namespace' | 'name'>): { netns: string; hostVeth: string; peerVeth: string } {
    const hash = createHash('sha256').update(`${this.config.bridge}/${spec.namespace}/${spec.name}`).digest('hex').slice(0, 8);
    const p = this.config.namePrefix;
    // Interface names are limited to 15 characters; netns names are files and may be longer.
    return { netns: `${p}_${spec.namespace}_${spec.name}`, hostVeth: `${p}v${hash}`, peerVeth: `${p}p${hash}` };
  }

  /** Creates the pod's network and cgroup and records it; the command is not started yet. */
  async create(spec: PodSpec, options: { detached: boolean }): Promise<PodRecord> {
    const node = spec.node ?? this.config.node;
    const podsCgroup = await this.nodeCgroup(node);
    const executable = await resolveExecutable(spec.command[0] ?? '');
    if (!executable) {
      throw new NodemeshError('NM_ERR_POD_COMMAND', `command "${spec.command[0]}" not found or not executable`, {
        context: { pod: spec.name, namespace: spec.namespace, field: 'command' },
        hint: 'give a path, or a command on PATH',
      });
    }
    return this.store.withLock(async () => {
      if (await this.store.get(spec.namespace, spec.name)) {
        throw new NodemeshError('NM_ERR_POD_EXISTS', `pod ${spec.namespace}/${spec.name} already exists`, {
          context: { pod: spec.name, namespace: spec.namespace },
          hint: `remove it first: nodemesh pod rm ${spec.name} --namespace ${spec.namespace}`,
        });
      }
      const existing = await this.store.list();
      const used = new Set(existing.filter((r) => r.bridge === this.config.bridge).map((r) => r.slot));
      let slot = 2;
      while (used.has(slot)) slot++;
      if (slot - 1 > podCapacity(this.config.podCidr4)) {
        throw new NodemeshError('NM_ERR_POD_CIDR_EXHAUSTED', `pod subnet ${this.config.podCidr4.network}/${this.config.podCidr4.prefix} is full`, {
          context: { pod: spec.name, namespace: spec.namespace },
          hint: 'remove pods or set a larger NODEMESH_POD_CIDR',
        });
      }
      const names = this.names(spec);
      const record: PodRecord = {
        uid: randomUUID(),
        node,
        name: spec.name,
        namespace: spec.namespace,
        serviceAccount: spec.serviceAccount,
        labels: spec.labels,
        ip4: hostAddress(this.config.podCidr4, 4, slot),
        ip6: hostAddress(this.config.podCidr6, 6, slot),
        slot,
        netns: names.netns,
        netnsPath: `/run/netns/${names.netns}`,
        cgroupPath: join(podsCgroup, `${spec.namespace}_${spec.name}`),
        hostVeth: names.hostVeth,
        bridge: this.config.bridge,
        command: [executable, ...spec.command.slice(1)],
        detached: options.detached,
        logPath: options.detached ? this.store.logPath(spec.namespace, spec.name) : null,
        pid: null,
        phase: 'creating',
        createdAt: new Date().toISOString(),
      };
      // The record goes first, so a crash half-way leaves something `pod rm` can clean.
      await this.store.write(record);
      const made: Made = { netns: false, veth: false, cgroup: false };
      try {
        await this.setUpNetwork(record, names.peerVeth, made);
        await createCgroup(record.cgroupPath);
        made.cgroup = true;
      } catch (e) {
        // Undo only what this call made: a netns or veth that already had our name is not ours.
        await this.tearDown(record, made);
        if (isNodemeshError(e)) throw e;
        throw new NodemeshError('NM_ERR_POD_SETUP', `creating pod ${spec.namespace}/${spec.name} failed: ${(e as Error).message}`, {
          context: { pod: spec.name, namespace: spec.namespace },
          cause: e,
        });
      }
      log.info({ pod: record.name, namespace: record.namespace, ip4: record.ip4, ip6: record.ip6 }, 'pod created');
      return record;
    });
  }

  private async ensureBridge(): Promise<void> {
    const br = this.config.bridge;
    try {
      await ip('link', 'show', 'dev', br);
      return;
    } catch (e) {
      if (!(e instanceof CommandFailed)) throw e;
    }
    await ip('link', 'add', br, 'type', 'bridge');
    await ip('addr', 'add', `${hostAddress(this.config.podCidr4, 4, 1)}/${this.config.podCidr4.prefix}`, 'dev', br);
    await ip('-6', 'addr', 'add', `${hostAddress(this.config.podCidr6, 6, 1)}/${this.config.podCidr6.prefix}`, 'dev', br, 'nodad');
    await ip('link', 'set', br, 'up');
  }

  private async setUpNetwork(r: PodRecord, peerVeth: string, made: Made): Promise<void> {
    await this.ensureBridge();
    // Addresses are reused: the host may still hold the neighbour entry (MAC) of the pod that had
    // them before, and would send this pod's first packets to a veth that is gone for up to a
    // neighbour timeout (a SYN lost, then retried for seconds).
    await bestEffort(() => ip('neigh', 'flush', 'to', r.ip4, 'dev', this.config.bridge), () => undefined);
    await bestEffort(() => ip('-6', 'neigh', 'flush', 'to', r.ip6, 'dev', this.config.bridge), () => undefined);
    await ip('netns', 'add', r.netns);
    made.netns = true;
    await ip('link', 'add', r.hostVeth, 'type', 'veth', 'peer', 'name', peerVeth);
    made.veth = true;
    await ip('link', 'set', peerVeth, 'netns', r.netns);
    await ip('-n', r.netns, 'link', 'set', peerVeth, 'name', 'eth0');
    await ip('-n', r.netns, 'link', 'set', 'lo', 'up');
    await ip('-n', r.netns, 'addr', 'add', `${r.ip4}/${this.config.podCidr4.prefix}`, 'dev', 'eth0');
    await ip('-n', r.netns, '-6', 'addr', 'add', `${r.ip6}/${this.config.podCidr6.prefix}`, 'dev', 'eth0', 'nodad');
    // The host side first: when eth0 comes up its peer is up, so it has carrier at once and gets
    // its link-local address then (not up to a second later), before the pod is handed to the
    // agent, which steers every address the pod has at enrollment.
    await ip('link', 'set', r.hostVeth, 'master', this.config.bridge);
    await ip('link', 'set', r.hostVeth, 'up');
    await ip('-n', r.netns, 'link', 'set', 'eth0', 'up');
  }

  /**
   * Spawns argv inside the pod's netns and cgroup (like `kubectl exec`). A shell joins the cgroup
   * first and then execs, so every socket the command opens belongs to the pod's cgroup.
   */
  exec(record: Pick<PodRecord, 'cgroupPath' | 'netns'>, argv: ReadonlyArray<string>, options: SpawnOptions = {}): ChildProcess {
    // The command gets a container runtime's default capabilities (Docker's and containerd's),
    // not root's full set: a local pod can do what a Kubernetes pod can (CAP_NET_RAW: raw
    // sockets, SO_MARK) and no more (no CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF), so tests of what a
    // pod can do to the mesh are true of a cluster's pods.
    const script = 'cg="$1"; ns="$2"; shift 2; echo $$ > "$cg/cgroup.procs" && exec ip netns exec "$ns" setpriv --bounding-set=-all,' + POD_CAPABILITIES + ' -- "$@"';
    return spawn('/bin/sh', ['-c', script, 'nodemesh-pod', record.cgroupPath, record.netns, ...argv], options);
  }

  /**
   * Starts the pod's own command; a detached pod's output goes to its log file. When an agent
   * runs on the node, the pod is handed to it first and the command starts only once the agent
   * has captured and verified it (see enrollment.ts): its first connection is already in the
   * mesh. A refusal or no answer within enrollTimeoutMs removes the pod and throws.
   */
  async start(record: PodRecord, options: StartOptions = {}): Promise<{ record: PodRecord; child: ChildProcess; enrollment: HandOver }> {
    let enrollment: HandOver;
    try {
      enrollment = await handOverPod(agentRunDir(this.config.stateDir, record.node), enrollPod(record), options.enrollTimeoutMs ?? DEFAULT_ENROLL_TIMEOUT_MS, () =>
        options.progress?.(`waiting for the node agent to capture pod ${record.namespace}/${record.name}`),
      );
    } catch (e) {
      await this.remove(record, 0).catch((err: unknown) => log.warn({ pod: record.name, namespace: record.namespace, err }, 'removing the pod the agent refused failed'));
      throw e;
    }
    if (enrollment.agent) log.info({ pod: record.name, namespace: record.namespace, enrolled: enrollment.enrolled }, 'pod handed to the node agent');
    let child: ChildProcess;
    if (record.detached && record.logPath) {
      const out = openSync(record.logPath, 'a');
      try {
        child = this.exec(record, record.command, { detached: true, stdio: ['ignore', out, out] });
      } finally {
        closeSync(out);
      }
      child.unref();
    } else {
      child = this.exec(record, record.command, { stdio: 'inherit' });
    }
    const pid = await new Promise<number>((resolve, reject) => {
      child.once('spawn', () => resolve(child.pid ?? -1));
      child.once('error', reject);
    }).catch(async (e: unknown) => {
      await this.remove(record);
      throw new NodemeshError('NM_ERR_POD_COMMAND', `starting pod ${record.namespace}/${record.name} failed: ${(e as Error).message}`, {
        context: { pod: record.name, namespace: record.namespace },
        cause: e,
      });
    });
    // The shell joins the cgroup before it execs the command; until it has (or has already
    // exited), `pod rm` could not find its process to stop it.
    if (!(await waitForCgroupMember(record.cgroupPath, pid, child, 5_000))) {
      child.kill('SIGKILL');
      await this.remove(record, 500);
      throw new NodemeshError('NM_ERR_POD_COMMAND', `pod ${record.namespace}/${record.name}: the command did not join the pod's cgroup within 5 s`, {
        context: { pod: record.name, namespace: record.namespace, path: record.cgroupPath },
      });
    }
    const running: PodRecord = { ...record, pid, phase: 'running' };
    await this.store.write(running);
    log.info({ pod: record.name, namespace: record.namespace, pid }, 'pod started');
    return { record: running, child, enrollment };
  }

  async list(): Promise<PodStatus[]> {
    const records = await this.store.list();
    return records.map((r) => ({ ...r, state: r.phase === 'creating' ? 'creating' : isAlive(r.pid) ? 'running' : 'exited' }));
  }

  async get(namespace: string, name: string): Promise<PodRecord> {
    const record = await this.store.get(namespace, name);
    if (!record) {
      throw new NodemeshError('NM_ERR_POD_NOT_FOUND', `pod ${namespace}/${name} not found`, {
        context: { pod: name, namespace },
        hint: 'see `nodemesh pod list`',
      });
    }
    return record;
  }

  /** Stops the pod's processes and removes its cgroup, veth, netns and record. */
  async remove(record: PodRecord, graceMs = 5_000): Promise<void> {
    // Out of its Services' endpoints first, then SIGTERM (Kubernetes' order): connections that
    // would have been sent to a pod that is stopping go elsewhere.
    await drainPod(agentRunDir(this.config.stateDir, record.node), record.uid);
    await stopCgroupProcesses(record.cgroupPath, graceMs).catch((e: unknown) => {
      log.warn({ pod: record.name, namespace: record.namespace, err: e }, 'stopping pod processes failed');
    });
    await this.store.withLock(() => this.tearDown(record));
    log.info({ pod: record.name, namespace: record.namespace }, 'pod removed');
  }

  /** Undoes the steps of create that `made` names; each tolerates its object being gone already. */
  private async tearDown(r: PodRecord, made: Made = EVERYTHING): Promise<void> {
    const failures: string[] = [];
    const note = (what: string) => (e: unknown) => {
      const msg = (e as Error).message;
      if (/Cannot find device|No such file|does not exist|Cannot open network namespace/i.test(msg)) return;
      failures.push(`${what}: ${msg}`);
    };
    if (made.veth) await bestEffort(() => ip('link', 'del', r.hostVeth), note(`delete veth ${r.hostVeth}`));
    if (made.netns) await bestEffort(() => ip('netns', 'del', r.netns), note(`delete netns ${r.netns}`));
    // Only the pod's own cgroup goes: the node's cgroup above it may carry the agent's gate, and
    // one removed and made again would not (a cgroup's BPF programs die with it).
    if (made.cgroup) await bestEffort(() => removeCgroup(r.cgroupPath, dirname(r.cgroupPath)), note(`remove cgroup ${r.cgroupPath}`));
    await this.store.remove(r);
    const others = (await this.store.list()).filter((o) => o.bridge === r.bridge);
    if (others.length === 0) {
      await bestEffort(() => ip('link', 'del', r.bridge), note(`delete bridge ${r.bridge}`));
      await this.store.removeIfEmpty().catch(note('remove state folder'));
    }
    if (failures.length > 0) {
      throw new NodemeshError('NM_ERR_POD_SETUP', `removing pod ${r.namespace}/${r.name} left: ${failures.join('; ')}`, {
        context: { pod: r.name, namespace: r.namespace },
      });
    }
  }
}

