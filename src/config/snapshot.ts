/**
 * The immutable routing view the proxy serves from: Services by virtual address and port, with
 * their endpoints computed from pods' labels. Built in one place (the agent in standalone mode
 * now, the control plane later) and swapped whole, never mutated.
 */
import type { SocketAddress } from '../agent/datapath/abi.js';
import type { Service, ServicePort } from './service.js';

export interface Workload {
  readonly uid: string;
  readonly name: string;
  readonly namespace: string;
  readonly serviceAccount: string;
  readonly labels: Readonly<Record<string, string>>;
  readonly ip4: string;
  readonly ip6: string;
}

export interface Endpoint {
  readonly workload: Workload;
  readonly port: number;
}

export interface ServiceTarget {
  readonly service: Service;
  readonly port: ServicePort;
  /** Ready endpoints, in a stable order (by pod namespace/name). */
  readonly endpoints: ReadonlyArray<Endpoint>;
  /** namespace/name:port, the key for per-service state such as load-balancer cursors. */
  readonly key: string;
}

/** Istio's workload name: the app label when there is one, else the pod name. */
export function workloadName(w: Pick<Workload, 'labels' | 'name'>): string {
  return w.labels['app.kubernetes.io/name'] ?? w.labels['app'] ?? w.name;
}

export function selects(selector: Readonly<Record<string, string>>, labels: Readonly<Record<string, string>>): boolean {
  const keys = Object.keys(selector);
  return keys.length > 0 && keys.every((k) => labels[k] === selector[k]);
}

const vipKey = (address: string, port: number): string => `${address}|${port}`;

export class MeshSnapshot {
  private readonly byVip = new Map<string, ServiceTarget>();
  private readonly byIp = new Map<string, Workload>();
  /** uid|targetPort -> the Service port that selects that workload there (inbound labels). */
  private readonly byEndpoint = new Map<string, ServiceTarget>();

  constructor(
    readonly version: number,
    readonly services: ReadonlyArray<Service>,
    readonly workloads: ReadonlyArray<Workload>,
  ) {
    for (const w of workloads) {
      this.byIp.set(w.ip4, w);
      this.byIp.set(w.ip6, w);
    }
    const sorted = [...workloads].sort((a, b) => `${a.namespace}/${a.name}`.localeCompare(`${b.namespace}/${b.name}`));
    for (const service of services) {
      const members = sorted.filter((w) => w.namespace === service.namespace && selects(service.selector, w.labels));
      for (const port of service.ports) {
        const target: ServiceTarget = {
          service,
          port,
          endpoints: members.map((workload) => ({ workload, port: port.targetPort })),
          key: `${service.namespace}/${service.name}:${port.port}`,
        };
        for (const ip of service.clusterIPs) this.byVip.set(vipKey(ip, port.port), target);
        for (const e of target.endpoints) {
          const k = `${e.workload.uid}|${e.port}`;
          if (!this.byEndpoint.has(k)) this.byEndpoint.set(k, target);
        }
      }
    }
    Object.freeze(this);
  }

  static empty(): MeshSnapshot {
    return new MeshSnapshot(0, [], []);
  }

  service(dst: SocketAddress): ServiceTarget | undefined {
    return this.byVip.get(vipKey(dst.address, dst.port));
  }

  workload(ip: string): Workload | undefined {
    return this.byIp.get(ip.replace(/^::ffff:/, ''));
  }

  /** The Service an inbound connection to this workload and port belongs to (the first, if several). */
  serviceOf(workloadUid: string, port: number): ServiceTarget | undefined {
    return this.byEndpoint.get(`${workloadUid}|${port}`);
  }

  targets(): ServiceTarget[] {
    return [...new Set(this.byVip.values())];
  }
}
