/**
 * Where the agent learns which pods run on its node: the local runtime's records (here), or the
 * kubelet's pods (kubernetes.ts: Pods from the API, cgroups under kubepods, netns of a process in them).
 */
import { existsSync, watch, type FSWatcher } from 'node:fs';

import type { ProxyPod } from '../../proxy/node-proxy.js';
import type { CniPod, EnrollPod } from '../../runtime/enrollment.js';
import type { Registry } from '../../shared/prom.js';
import { PodStore, type PodRecord, type RecordCache } from '../../runtime/store.js';
import { checkPodFields, PodFieldInvalid, type PodEdge } from './validate.js';

export interface NodePod extends ProxyPod {
  readonly cgroupPath: string;
}

/** A pod that is on the node but cannot be enrolled as it is, with the reason. */
export interface PodProblem {
  readonly uid: string;
  readonly namespace: string;
  readonly name: string;
  readonly reason: 'netns_missing' | 'cgroup_missing' | 'invalid_record';
  readonly message: string;
}

export interface PodListing {
  readonly pods: ReadonlyArray<NodePod>;
  readonly problems: ReadonlyArray<PodProblem>;
  /**
   * False while the source does not know every pod of the node yet (the API server has not
   * answered the first list): pods it does not list are then not taken for gone.
   */
  readonly complete?: boolean;
}

export interface PodSource {
  list(): Promise<PodListing>;
  /** Calls onChange (possibly spuriously) when pods may have changed; returns a stop function. */
  watch(onChange: () => void): () => void;
  /** Its metrics, into the agent's registry. */
  register?(registry: Registry): void;
  /**
   * A pod the CNI plugin hands over, completed from what the source knows (its Pod object, its
   * cgroup): waits for the source to see the Pod, at most until the deadline. Only sources that
   * serve Kubernetes pods have it.
   */
  fromCni?(pod: CniPod, deadline: number, signal: AbortSignal): Promise<EnrollPod>;
  /** Whether it knows the node's pods, and what keeps it degraded (the agent serves on, and says so). */
  health?(): { readonly synced: boolean; readonly degraded: ReadonlyArray<string> };
}

export class LocalRuntimePodSource implements PodSource {
  private readonly store: PodStore;
  /** The agent polls every second: unchanged records are neither read nor parsed again. */
  private readonly records: RecordCache = new Map();
  /** One NodePod object per record object, so an unchanged pod is the same object on every pass. */
  private readonly nodePods = new WeakMap<PodRecord, NodePod>();

  /** `node`: the node served (records of other nodes are not its pods); `edge`: what a record must satisfy (pod cgroups, netns folder, pod subnets). */
  constructor(
    stateDir: string,
    private readonly node: string,
    private readonly edge: PodEdge,
  ) {
    this.store = new PodStore(stateDir);
  }

  async list(): Promise<PodListing> {
    const pods: NodePod[] = [];
    const problems: PodProblem[] = [];
    const { records, errors } = await this.store.scan(this.records);
    for (const e of errors) {
      const file = e.context.path ?? '';
      const key = file.split('/').pop()?.replace(/\.json$/, '') ?? file;
      problems.push({ uid: `record:${file}`, namespace: key.split('_')[0] ?? '', name: key.split('_').slice(1).join('_'), reason: 'invalid_record', message: e.message });
    }
    // An address is one pod's: a second record claiming it would take over its inbound listener.
    const owners = new Map<string, string>();
    for (const r of records) {
      if (r.phase !== 'running' || r.node !== this.node) continue;
      const id = { uid: String(r.uid), namespace: String(r.namespace), name: String(r.name) };
      try {
        checkPodFields(r, this.edge);
      } catch (e) {
        if (!(e instanceof PodFieldInvalid)) throw e;
        problems.push({ ...id, reason: 'invalid_record', message: `pod record ${id.namespace}/${id.name}: ${e.message}` });
        continue;
      }
      const taken = [r.ip4, r.ip6].map((a) => [a, owners.get(a)] as const).find(([, owner]) => owner !== undefined);
      if (taken) {
        problems.push({ ...id, reason: 'invalid_record', message: `pod record ${id.namespace}/${id.name}: address ${taken[0]} is pod ${taken[1] ?? ''}'s` });
        continue;
      }
      owners.set(r.ip4, `${r.namespace}/${r.name}`);
      owners.set(r.ip6, `${r.namespace}/${r.name}`);
      if (!existsSync(r.netnsPath)) {
        problems.push({ ...id, reason: 'netns_missing', message: `network namespace ${r.netnsPath} does not exist` });
      } else if (!existsSync(r.cgroupPath)) {
        problems.push({ ...id, reason: 'cgroup_missing', message: `cgroup ${r.cgroupPath} does not exist` });
      } else {
        let pod = this.nodePods.get(r);
        if (!pod) {
          pod = { ...id, serviceAccount: r.serviceAccount, labels: r.labels, ip4: r.ip4, ip6: r.ip6, netnsPath: r.netnsPath, cgroupPath: r.cgroupPath };
          this.nodePods.set(r, pod);
        }
        pods.push(pod);
      }
    }
    return { pods, problems };
  }

  watch(onChange: () => void): () => void {
    let watcher: FSWatcher | undefined;
    const arm = (): void => {
      if (watcher || !existsSync(this.store.podsDir)) return;
      try {
        watcher = watch(this.store.podsDir, () => onChange());
        watcher.on('error', () => {
          watcher?.close();
          watcher = undefined;
        });
      } catch {
        watcher = undefined;
      }
    };
    arm();
    // The folder may appear or be replaced later; a slow poll also covers missed events.
    const timer = setInterval(() => {
      arm();
      onChange();
    }, 1000);
    timer.unref();
    return () => {
      clearInterval(timer);
      watcher?.close();
    };
  }
}
