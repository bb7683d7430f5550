// SPDX-License-Identifier: Apache-2.0
/**
 * Gives the V8 heap back after a load, once the process is idle.
 *
 * The agent and the control plane run with V8's memory reducer off (bin/nodemesh.js,
 * daemonset/Dockerfile). The reducer shrinks the heap with a full, compacting collection when V8
 * sees the allocation rate fall, and on a proxy that is when a load drops to a lower rate, not to
 * none: pauses of 10-20 ms of the loop that carries the HBONE and HTTP traffic while requests still
 * flow (two hops at 1000 requests/s right after a load: p99 1.2-1.4 ms with the reducer, 0.42 ms
 * without; README, "L7, eleventh session"). Without it, a heap would keep its high-water mark
 * (an agent with 100 idle pods: 85 MiB resident against 69). HeapTrim makes the same collection
 * (`trim`: V8's LowMemoryNotification, in the addon) only when the loop has been idle for a while
 * and the heap has grown since the last one: the pause then delays no request.
 */
import { getHeapStatistics } from 'node:v8';
import { performance, type EventLoopUtilization } from 'node:perf_hooks';

import { logger } from './log.js';

const log = logger('heap');

export interface HeapTrimOptions {
  /** The collection: a pause of the JS thread. */
  readonly trim: () => void;
  /** How often the loop's busy share is sampled, ms (default 5000). */
  readonly intervalMs?: number;
  /** Consecutive idle samples before a trim (default 2: at least 10 s idle). */
  readonly quietSamples?: number;
  /** A sample is idle when the loop was busy for less than this share of it (default 0.025: an agent with 100 idle pods is at about 0.011, one carrying 1000 HTTP requests/s over 0.1). */
  readonly idleShare?: number;
  /** The committed heap must have grown by this much since the last trim, bytes (default 4 MiB). */
  readonly growthBytes?: number;
  /** The loop's busy share since the previous call (default: performance.eventLoopUtilization). */
  readonly busyShare?: () => number;
  /** The committed V8 heap, bytes (default: v8.getHeapStatistics().total_heap_size). */
  readonly heapBytes?: () => number;
}

export interface TrimRecord {
  readonly before: number;
  readonly after: number;
  readonly ms: number;
}

/** The loop's busy share since the previous call, from node's event-loop utilization. */
function loopBusyShare(): () => number {
  let last: EventLoopUtilization = performance.eventLoopUtilization();
  return () => {
    const now = performance.eventLoopUtilization();
    const share = performance.eventLoopUtilization(now, last).utilization;
    last = now;
    return share;
  };
}

export class HeapTrim {
  private readonly trim: () => void;
  private readonly intervalMs: number;
  private readonly quietSamples: number;
  private readonly idleShare: number;
  private readonly growthBytes: number;
  private readonly busyShare: () => number;
  private readonly heapBytes: () => number;
  private timer: NodeJS.Timeout | undefined;
  private quiet = 0;
  /** The committed heap right after the last trim; none yet: the first idle spell trims what starting up left. */
  private floor = 0;
  /** Every trim made, oldest first (the last 16). */
  readonly trims: TrimRecord[] = [];

  constructor(options: HeapTrimOptions) {
    this.trim = options.trim;
    this.intervalMs = options.intervalMs ?? 5000;
    this.quietSamples = options.quietSamples ?? 2;
    this.idleShare = options.idleShare ?? 0.025;
    this.growthBytes = options.growthBytes ?? 4 * 1024 * 1024;
    this.busyShare = options.busyShare ?? loopBusyShare();
    this.heapBytes = options.heapBytes ?? (() => getHeapStatistics().total_heap_size);
  }

  start(): this {
    this.timer ??= setInterval(() => this.sample(), this.intervalMs).unref();
    return this;
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
  }

  /** One sample: counts idle ones in a row, trims after `quietSamples` of them if the heap grew. Returns whether it trimmed. */
  sample(): boolean {
    const busy = this.busyShare();
    this.quiet = busy < this.idleShare ? this.quiet + 1 : 0;
    if (this.quiet < this.quietSamples) return false;
    const before = this.heapBytes();
    // A heap that shrank on its own (a collection under load) lowers the mark to grow from.
    if (before < this.floor) this.floor = before;
    if (before - this.floor < this.growthBytes) return false;
    const started = performance.now();
    this.trim();
    const ms = performance.now() - started;
    const after = this.heapBytes();
    this.floor = after;
    this.quiet = 0;
    this.trims.push({ before, after, ms });
    if (this.trims.length > 16) this.trims.shift();
    log.info({ heapBefore: before, heapAfter: after, ms: Math.round(ms * 10) / 10, busyShare: Math.round(busy * 10000) / 10000 }, 'idle: V8 heap trimmed');
    return true;
  }
}
