/**
 * Endpoint choice per Service port (per connection at L4, per request on HTTP routes), as its
 * TrafficPolicy says: round robin (default), least connections or requests (the less loaded of two
 * endpoints drawn at random, Envoy's power of two choices; with two endpoints the less loaded, ties
 * in round robin) or random, over the endpoints that are not ejected. Passive health: an endpoint that fails
 * `consecutiveConnectErrors` connects in a row, or answers `consecutive5xxErrors` 5xx or
 * `consecutiveGatewayErrors` 502-504 in a row, is ejected for baseEjectionTime times its number of
 * ejections (rounded up to the sweep interval), within maxEjectionPercent of the Service's
 * endpoints (at least one may always be ejected). When every endpoint is ejected, all are used
 * again (panic), since refusing everything helps nobody.
 */
import type { Endpoint, ServiceTarget } from '../../config/snapshot.js';

/** Endpoint objects live as long as their snapshot; their keys are made once (a key made per lookup is hashed per lookup). */
const endpointKeys = new WeakMap<Endpoint, string>();
const endpointKey = (e: Endpoint): string => {
  let key = endpointKeys.get(e);
  if (key === undefined) endpointKeys.set(e, (key = `${e.workload.uid}:${e.port}`));
  return key;
};
/** A split's signature (its backends and weights), made once per split of a snapshot. */
const signatures = new WeakMap<ReadonlyArray<{ readonly target: ServiceTarget; readonly weight: number }>, string>();

interface Health {
  consecutiveErrors: number;
  /** HTTP answers 500-599, and of those 502-504, in a row. */
  consecutive5xx: number;
  consecutiveGateway: number;
  ejections: number;
  ejectedUntil: number;
}

export class LoadBalancer {
  private readonly cursors = new Map<string, number>();
  private readonly active = new Map<string, number>();
  private readonly perTarget = new Map<string, number>();
  private readonly health = new Map<string, Health>();
  /** Smooth weighted round robin state per routed Service port (reset when its split changes). */
  private readonly weighted = new Map<string, { signature: string; current: number[] }>();

  constructor(private readonly now: () => number = Date.now) {}

  /**
   * Picks an endpoint, or undefined if the target has none. `avoid` is skipped when there is
   * another. With `hashKey` (the policy's consistentHash: a header, cookie or source address) the
   * endpoint is the key's by rendezvous hashing, the same while it is there and not ejected.
   */
  pick(target: ServiceTarget, avoid?: Endpoint, hashKey?: string): Endpoint | undefined {
    const all = target.endpoints;
    if (all.length === 0) return undefined;
    const now = this.now();
    // Nothing ejected and nothing to avoid (most picks): every endpoint, without a copy.
    let eps: ReadonlyArray<Endpoint> = avoid === undefined && this.health.size === 0 ? all : all.filter((e) => !this.isEjected(e, now) && (avoid === undefined || endpointKey(e) !== endpointKey(avoid)));
    if (eps.length === 0) eps = all.filter((e) => avoid === undefined || endpointKey(e) !== endpointKey(avoid));
    if (eps.length === 0) eps = [...all];
    if (hashKey !== undefined && target.policy.hashOn) return rendezvous(eps, hashKey);
    const mode = target.policy.loadBalancing;
    if (mode === 'random') return eps[Math.floor(Math.random() * eps.length)];
    if (mode === 'least-connections' && eps.length > 2) {
      // Power of two choices: O(1), and it never herds every pick onto one endpoint whose count
      // has not caught up yet (Envoy's LEAST_REQUEST with choice_count 2).
      const i = Math.floor(Math.random() * eps.length);
      const j = (i + 1 + Math.floor(Math.random() * (eps.length - 1))) % eps.length;
      const [a, b] = [eps[i], eps[j]];
      if (!a || !b) return a ?? b;
      return (this.active.get(endpointKey(b)) ?? 0) < (this.active.get(endpointKey(a)) ?? 0) ? b : a;
    }
    const start = this.next(target.key, eps.length);
    if (mode === 'round-robin') return eps[start];
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

  /**
   * The endpoints pick() chooses from when nothing is avoided (those not ejected; all of them when
   * every one is), and for how many milliseconds that holds: until the first ejection among them
   * ends (Infinity when none is ejected).
   */
  eligible(target: ServiceTarget): { readonly endpoints: ReadonlyArray<Endpoint>; readonly forMs: number } {
    const all = target.endpoints;
    if (this.health.size === 0) return { endpoints: all, forMs: Infinity };
    const now = this.now();
    let forMs = Infinity;
    const endpoints = all.filter((e) => {
      const until = this.health.get(endpointKey(e))?.ejectedUntil ?? 0;
      if (until <= now) return true;
      forMs = Math.min(forMs, until - now);
      return false;
    });
    return endpoints.length > 0 ? { endpoints, forMs } : { endpoints: all, forMs };
  }

  private next(key: string, n: number): number {
    const i = ((this.cursors.get(key) ?? -1) + 1) % n;
    this.cursors.set(key, i);
    return i;
  }

  /**
   * A routed Service's backend for the next connection: smooth weighted round robin (nginx's), so
   * weights 1:3 give exactly one in four to the first, spread out rather than in runs.
   */
  pickBackend(target: ServiceTarget): ServiceTarget | undefined {
    return target.split ? this.pickWeighted(target.key, target.split)?.target : undefined;
  }

  /**
   * The next of `split` by weight, smooth weighted round robin kept under `key`: the target's key,
   * or for a rule of an HTTP route `<target key>#<route>#<rule>` (each rule splits on its own).
   */
  pickWeighted<B extends { readonly target: ServiceTarget; readonly weight: number }>(key: string, split: ReadonlyArray<B>): B | undefined {
    if (split.length === 0) return undefined;
    let signature = signatures.get(split);
    if (signature === undefined) signatures.set(split, (signature = split.map((b) => `${b.target.key}*${b.weight}`).join(',')));
    let state = this.weighted.get(key);
    if (!state || state.signature !== signature) {
      state = { signature, current: split.map(() => 0) };
      this.weighted.set(key, state);
    }
    let total = 0;
    let best = 0;
    for (let i = 0; i < split.length; i++) {
      const w = split[i]?.weight ?? 0;
      total += w;
      state.current[i] = (state.current[i] ?? 0) + w;
      if ((state.current[i] ?? 0) > (state.current[best] ?? 0)) best = i;
    }
    state.current[best] = (state.current[best] ?? 0) - total;
    return split[best];
  }

  /** Whether the Service's connection limit (TrafficPolicy maxConnections) leaves room for one more. */
  hasCapacity(target: ServiceTarget): boolean {
    return (this.perTarget.get(target.key) ?? 0) < target.policy.maxConnections;
  }

  acquire(target: ServiceTarget, e: Endpoint): void {
    bump(this.active, endpointKey(e), 1);
    bump(this.perTarget, target.key, 1);
  }

  release(target: ServiceTarget, e: Endpoint): void {
    bump(this.active, endpointKey(e), -1);
    bump(this.perTarget, target.key, -1);
  }

  activeConnections(e: Endpoint): number {
    return this.active.get(endpointKey(e)) ?? 0;
  }

  /** Records a failed connect; returns true when this failure ejected the endpoint. */
  connectFailed(target: ServiceTarget, e: Endpoint): boolean {
    const h = this.healthOf(e);
    h.consecutiveErrors++;
    return h.consecutiveErrors >= target.policy.outlier.consecutiveConnectErrors && this.eject(target, e, h);
  }

  /**
   * Records an HTTP answer of the endpoint: 5xx answers and gateway errors (502, 503, 504) in a
   * row eject it as the policy says (0: never); any other answer clears both counts. Returns true
   * when this answer ejected the endpoint.
   */
  answered(target: ServiceTarget, e: Endpoint, status: number): boolean {
    const { consecutive5xxErrors, consecutiveGatewayErrors } = target.policy.outlier;
    if (status < 500) {
      const key = endpointKey(e);
      const h = this.health.get(key);
      if (h) {
        h.consecutive5xx = 0;
        h.consecutiveGateway = 0;
        // Nothing left to remember: forgotten, so that picks go back to the path without ejections.
        if (h.consecutiveErrors === 0 && h.ejections === 0 && h.ejectedUntil <= this.now()) this.health.delete(key);
      }
      return false;
    }
    const h = this.healthOf(e);
    h.consecutive5xx++;
    if (status >= 502 && status <= 504) h.consecutiveGateway++;
    else h.consecutiveGateway = 0;
    const trips = (consecutive5xxErrors > 0 && h.consecutive5xx >= consecutive5xxErrors) || (consecutiveGatewayErrors > 0 && h.consecutiveGateway >= consecutiveGatewayErrors);
    return trips && this.eject(target, e, h);
  }

  private healthOf(e: Endpoint): Health {
    const key = endpointKey(e);
    let h = this.health.get(key);
    if (!h) {
      h = { consecutiveErrors: 0, consecutive5xx: 0, consecutiveGateway: 0, ejections: 0, ejectedUntil: 0 };
      this.health.set(key, h);
    }
    return h;
  }

  /**
   * Ejects the endpoint for baseEjectionTime times its number of ejections, rounded up to the
   * policy's sweep interval, unless it is out already or maxEjectionPercent of the Service's
   * endpoints are (at least one may always be).
   */
  private eject(target: ServiceTarget, e: Endpoint, h: Health): boolean {
    const { baseEjectionMs, maxEjectionPercent, intervalMs } = target.policy.outlier;
    const now = this.now();
    if (h.ejectedUntil > now) return false;
    const ejected = target.endpoints.filter((x) => this.isEjected(x, now)).length;
    const allowed = maxEjectionPercent === 0 ? 0 : Math.max(1, Math.floor((target.endpoints.length * maxEjectionPercent) / 100));
    if (ejected >= allowed) return false;
    h.ejections++;
    const interval = Math.max(1, intervalMs);
    h.ejectedUntil = now + Math.ceil((baseEjectionMs * h.ejections) / interval) * interval;
    h.consecutiveErrors = 0;
    h.consecutive5xx = 0;
    h.consecutiveGateway = 0;
    return true;
  }

  connectSucceeded(e: Endpoint): void {
    const h = this.health.get(endpointKey(e));
    if (!h) return;
    h.consecutiveErrors = 0;
    // A healthy endpoint that has served its ejection forgets it, so the next one is short again
    // (its run of HTTP errors, if any, still counts).
    if (h.ejectedUntil > this.now()) return;
    if (h.consecutive5xx === 0 && h.consecutiveGateway === 0) this.health.delete(endpointKey(e));
    else h.ejections = 0;
  }

  isEjected(e: Endpoint, now = this.now()): boolean {
    return (this.health.get(endpointKey(e))?.ejectedUntil ?? 0) > now;
  }

  /** Forgets state of endpoints and Services that are no longer in the snapshot. */
  retain(targets: ReadonlyArray<ServiceTarget>): void {
    const endpoints = new Set(targets.flatMap((t) => t.endpoints.map(endpointKey)));
    const keys = new Set(targets.map((t) => t.key));
    for (const k of this.health.keys()) if (!endpoints.has(k)) this.health.delete(k);
    for (const k of this.cursors.keys()) if (!keys.has(k)) this.cursors.delete(k);
    for (const k of this.weighted.keys()) if (!keys.has(k.split('#')[0] ?? k)) this.weighted.delete(k);
  }
}

/** The endpoint with the highest hash of (key, endpoint): highest random weight hashing. */
function rendezvous(eps: ReadonlyArray<Endpoint>, key: string): Endpoint | undefined {
  let best: Endpoint | undefined;
  let bestScore = -1;
  for (const e of eps) {
    const score = fnv1a(`${key}\u0000${endpointKey(e)}`);
    if (score > bestScore) {
      best = e;
      bestScore = score;
    }
  }
  return best;
}

/** 32-bit FNV-1a, mixed once more so that near keys spread (murmur3's finalizer). */
function fnv1a(text: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

function bump(m: Map<string, number>, key: string, by: number): void {
  const n = (m.get(key) ?? 0) + by;
  if (n <= 0) m.delete(key);
  else m.set(key, n);
}
