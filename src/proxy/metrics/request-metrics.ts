/**
 * Istio's four request metrics (istio_requests_total, istio_request_duration_milliseconds,
 * istio_request_bytes, istio_response_bytes), kept per series here and exposed through the
 * prom-client registry like any other metric.
 *
 * Why not prom-client's Counter and Histogram: with Istio's 17 labels, each of their calls
 * validates every label against every name and hashes the sorted set, four times per request;
 * profiled on the L7 path (bench:l7 with BENCH_L7_ONLY=client) that was most of the JS work per
 * request, more than routing it. Here the connection's labels (the 15 of istio_tcp_*, one object
 * per connection and destination) are keyed once; a request costs a WeakMap lookup on that object
 * and one on its four answer labels, for all four metrics. The text on /metrics is the same.
 */
import type { Metric } from 'prom-client';

import type { Registry } from '../../shared/prom.js';

import { TCP_LABELS, type RequestLabels, type TcpLabels } from './metrics.js';

/** Observations in buckets (upper bounds, each counted on its own; cumulated when exposed), and their sum. */
class Bins {
  readonly counts: Float64Array;
  sum = 0;

  constructor(size: number) {
    this.counts = new Float64Array(size);
  }
}

interface Series {
  readonly labels: RequestLabels;
  count: number;
  readonly duration: Bins;
  readonly requestBytes: Bins;
  readonly responseBytes: Bins;
}

/** What prom-client's registry reads of a metric (its get()), and our series behind it. */
interface ExposedValue {
  readonly labels: Record<string, string | number>;
  readonly value: number;
  readonly metricName?: string;
}

const DURATION_BUCKETS = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000, 3600000];
const BYTES_BUCKETS = [1, 10, 100, 1000, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000];

function observe(bins: Bins, bounds: ReadonlyArray<number>, value: number): void {
  bins.sum += value;
  for (let i = 0; i < bounds.length; i++) {
    if (value <= (bounds[i] ?? Infinity)) {
      bins.counts[i] = (bins.counts[i] ?? 0) + 1;
      return;
    }
  }
}

/** What a request adds to its connection's labels. */
export interface RequestOutcome {
  readonly protocol: 'http' | 'grpc';
  readonly flag: string;
  readonly status: number;
  readonly grpcStatus: string;
}

/**
 * The connection's labels that a request keeps (request_protocol and response_flags are its own).
 * Made on first use: metrics.ts, which defines TCP_LABELS, imports this module.
 */
let tcpKeyed: ReadonlyArray<(typeof TCP_LABELS)[number]> | undefined;

/** The series of one set of connection labels by outcome, and the last one used (most requests have the outcome of the one before: no key made for them). */
interface Outcomes {
  readonly byKey: Map<string, Series>;
  last: { readonly outcome: RequestOutcome; readonly series: Series } | undefined;
}

const sameOutcome = (a: RequestOutcome, b: RequestOutcome): boolean => a.status === b.status && a.flag === b.flag && a.protocol === b.protocol && a.grpcStatus === b.grpcStatus;

export class RequestMetrics {
  /** Every series, for the registry to read. */
  private series: Series[] = [];
  /** A connection's labels object -> the series of its requests by outcome (same labels, same map). */
  private byConnection = new WeakMap<TcpLabels, Outcomes>();
  /** The connection labels' values -> the series of their requests by outcome. */
  private byValues = new Map<string, Outcomes>();

  constructor(registry: Registry) {
    const all = (): Iterable<Series> => this.series;
    const counter = {
      name: 'istio_requests_total',
      help: "HTTP requests the node proxy read (reporter source: on the caller's node, Services with L7 routes or request policies; destination: on the callee's, ports with request-level authorization or rate limits), by answer",
      type: 'counter',
      aggregator: 'sum',
      get: async () => ({ name: counter.name, help: counter.help, type: counter.type, aggregator: counter.aggregator, values: [...all()].map((s): ExposedValue => ({ labels: s.labels, value: s.count })) }),
      reset: () => this.reset(),
    };
    const histogram = (name: string, help: string, bounds: ReadonlyArray<number>, bins: (s: Series) => Bins): Record<string, unknown> => {
      const m = {
        name,
        help,
        type: 'histogram',
        aggregator: 'sum',
        get: async () => {
          const values: ExposedValue[] = [];
          for (const s of all()) {
            const b = bins(s);
            let acc = 0;
            for (let i = 0; i < bounds.length; i++) {
              acc += b.counts[i] ?? 0;
              values.push({ labels: { le: bounds[i] ?? 0, ...s.labels }, value: acc, metricName: `${name}_bucket` });
            }
            values.push({ labels: { le: '+Inf', ...s.labels }, value: s.count, metricName: `${name}_bucket` });
            values.push({ labels: s.labels, value: b.sum, metricName: `${name}_sum` });
            values.push({ labels: s.labels, value: s.count, metricName: `${name}_count` });
          }
          return { name, help, type: 'histogram', aggregator: 'sum', values };
        },
        reset: () => this.reset(),
      };
      return m;
    };
    // The registry takes any object with a name and get(); its Metric type names only its own classes.
    for (const m of [
      counter,
      histogram('istio_request_duration_milliseconds', 'From the request head to the end of the answer, in milliseconds', DURATION_BUCKETS, (s) => s.duration),
      histogram('istio_request_bytes', 'Body bytes of each HTTP request, as the client sent them', BYTES_BUCKETS, (s) => s.requestBytes),
      histogram('istio_response_bytes', 'Body bytes of each HTTP answer, as passed back to the client', BYTES_BUCKETS, (s) => s.responseBytes),
    ]) {
      registry.registerMetric(m as unknown as Metric);
    }
  }

  /** One request on a connection labelled `tcp`: counted, its duration and body bytes observed, under the labels both give. */
  record(tcp: TcpLabels, outcome: RequestOutcome, ms: number, bytesIn: number, bytesOut: number): void {
    let outcomes = this.byConnection.get(tcp);
    if (!outcomes) {
      let key = '';
      tcpKeyed ??= TCP_LABELS.filter((n) => n !== 'request_protocol' && n !== 'response_flags');
      for (const name of tcpKeyed) key += `${tcp[name]}\u0001`;
      outcomes = this.byValues.get(key);
      if (!outcomes) this.byValues.set(key, (outcomes = { byKey: new Map(), last: undefined }));
      this.byConnection.set(tcp, outcomes);
    }
    let s = outcomes.last !== undefined && sameOutcome(outcomes.last.outcome, outcome) ? outcomes.last.series : undefined;
    if (!s) {
      const key = `${outcome.status}\u0001${outcome.flag}\u0001${outcome.protocol}\u0001${outcome.grpcStatus}`;
      s = outcomes.byKey.get(key);
      if (!s) {
        const labels: RequestLabels = { ...tcp, request_protocol: outcome.protocol, response_flags: outcome.flag, response_code: String(outcome.status), grpc_response_status: outcome.grpcStatus };
        s = { labels, count: 0, duration: new Bins(DURATION_BUCKETS.length), requestBytes: new Bins(BYTES_BUCKETS.length), responseBytes: new Bins(BYTES_BUCKETS.length) };
        outcomes.byKey.set(key, s);
        this.series.push(s);
      }
      outcomes.last = { outcome: { ...outcome }, series: s };
    }
    s.count++;
    observe(s.duration, DURATION_BUCKETS, ms);
    observe(s.requestBytes, BYTES_BUCKETS, bytesIn);
    observe(s.responseBytes, BYTES_BUCKETS, bytesOut);
  }

  private reset(): void {
    this.series = [];
    this.byConnection = new WeakMap();
    this.byValues = new Map();
  }
}
