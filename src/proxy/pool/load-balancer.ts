/** L4 endpoint choice: round robin (default) and least connections, per service port. */
import type { Endpoint, ServiceTarget } from '../../config/snapshot.js';

export type LoadBalancing = 'round-robin' | 'least-connections';

const endpointKey = (e: Endpoint): string => `${e.workload.uid}:${e.port}`;

export class LoadBalancer {
  private readonly cursors = new Map<string, number>();
  private readonly active = new Map<string, number>();

  constructor(private readonly mode: LoadBalancing = 'round-robin') {}

  /** Picks an endpoint, or undefined if the target has none. Call release() when it closes. */
  pick(target: ServiceTarget, mode: LoadBalancing = this.mode): Endpoint | undefined {
    const eps = target.endpoints;
    if (eps.length === 0) return undefined;
    if (mode === 'least-connections') {
      // Ties go round robin, so equal load still spreads.
      const start = this.next(target.key, eps.length);
      let best: Endpoint | undefined;
      let bestActive = Infinity;
      for (let i = 0; i < eps.length; i++) {
        const e = eps[(start + i) % eps.length];
        if (!e) continue;
        const n = this.active.get(endpointKey(e)) ?? 0;
        if (n < bestActive) {
          best = e;
          bestActive = n;
        }
      }
      return best;
    }
    return eps[this.next(target.key, eps.length)];
  }

  private next(key: string, n: number): number {
    const i = (this.cursors.get(key) ?? -1) + 1;
    this.cursors.set(key, i % n);
    return i % n;
  }

  acquire(e: Endpoint): void {
    const k = endpointKey(e);
    this.active.set(k, (this.active.get(k) ?? 0) + 1);
  }

  release(e: Endpoint): void {
    const k = endpointKey(e);
    const n = (this.active.get(k) ?? 1) - 1;
    if (n <= 0) this.active.delete(k);
    else this.active.set(k, n);
  }

  activeConnections(e: Endpoint): number {
    return this.active.get(endpointKey(e)) ?? 0;
  }
}
