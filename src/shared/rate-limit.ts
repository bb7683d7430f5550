/**
 * Token buckets per key (a node, a token, a client identity): `burst` requests at once, then
 * `perSecond`. At most `maxKeys` keys are tracked; the least recently used goes first (it starts
 * full again).
 */
export class RateLimiter {
  private readonly buckets = new Map<string, { tokens: number; at: number }>();

  constructor(
    private readonly burst: number,
    private readonly perSecond: number,
    private readonly maxKeys = 10_000,
  ) {}

  /** Takes one token for key; false when its bucket is empty. */
  take(key: string, now = Date.now()): boolean {
    return this.wait(key, now) === 0;
  }

  /** Takes one token for key and answers 0; or, when its bucket is empty, takes none and answers the milliseconds until it holds one. */
  wait(key: string, now = Date.now()): number {
    const b = this.buckets.get(key);
    const tokens = b ? Math.min(this.burst, b.tokens + ((now - b.at) / 1000) * this.perSecond) : this.burst;
    const allowed = tokens >= 1;
    // Re-inserted: the map's order is the order of last use.
    this.buckets.delete(key);
    this.buckets.set(key, { tokens: allowed ? tokens - 1 : tokens, at: now });
    if (this.buckets.size > this.maxKeys) {
      const oldest = this.buckets.keys().next().value;
      if (oldest !== undefined) this.buckets.delete(oldest);
    }
    return allowed ? 0 : Math.ceil(((1 - tokens) / this.perSecond) * 1000);
  }
}
