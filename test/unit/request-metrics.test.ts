/** Istio's request metrics as RequestMetrics keeps them: the same text prom-client's Counter and Histogram write for the same requests. */
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { Counter, Histogram, Registry } from '../../src/shared/prom.js';
import { REQUEST_LABELS, TCP_LABELS, type RequestLabels, type TcpLabels } from '../../src/proxy/metrics/metrics.js';
import { RequestMetrics } from '../../src/proxy/metrics/request-metrics.js';

/** Sample lines without HELP/TYPE, labels sorted within each line, lines sorted: the order of either does not matter to Prometheus. */
function normalized(text: string, name: string): string[] {
  return text
    .split('\n')
    .filter((l) => l.startsWith(name))
    .map((l) => {
      const m = /^([^{ ]+)(?:\{(.*)\})? (.*)$/.exec(l);
      const labels = (m?.[2] ?? '').split(/,(?=[a-z_]+=")/).sort().join(',');
      return `${m?.[1] ?? ''}{${labels}} ${Number(m?.[3])}`;
    })
    .sort();
}

test('RequestMetrics writes what prom-client writes for the same requests (counter, three histograms, every bucket edge)', async () => {
  const ours = new Registry();
  const metrics = new RequestMetrics(ours);
  const theirs = new Registry();
  const registers = [theirs];
  const requests = new Counter({ name: 'istio_requests_total', help: 'h', labelNames: REQUEST_LABELS, registers });
  const duration = new Histogram({ name: 'istio_request_duration_milliseconds', help: 'h', labelNames: REQUEST_LABELS, buckets: [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000, 3600000], registers });
  const bytes = (name: string): Histogram<(typeof REQUEST_LABELS)[number]> => new Histogram({ name, help: 'h', labelNames: REQUEST_LABELS, buckets: [1, 10, 100, 1000, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000], registers });
  const requestBytes = bytes('istio_request_bytes');
  const responseBytes = bytes('istio_response_bytes');
  // Connections' labels as the proxy hands them: one object per connection, equal values on two
  // connections (a and b) count as one series, another workload (c) as its own.
  const connection = (workload: string): TcpLabels => Object.fromEntries(TCP_LABELS.map((n) => [n, n === 'source_workload' ? workload : n === 'request_protocol' ? 'tcp' : n === 'response_flags' ? '-' : `${n}-v`])) as TcpLabels;
  const [a, b, c] = [connection('client'), connection('client'), connection('other')];
  const samples: Array<[TcpLabels, number, string, number, number, number, string?]> = [
    [a, 200, '-', 0.4, 0, 1024],
    [b, 200, '-', 1, 1, 10],
    [a, 200, '-', 5.0001, 100_000_001, 0],
    [c, 200, '-', 2, 3, 4],
    [a, 503, 'UF', 3_600_001, 7, 99],
    [b, 404, 'NR', 25, 10_000, 1_000_000],
    [c, 200, '-', 7, 7, 7, '0'],
  ];
  for (const [tcp, status, flag, ms, bytesIn, bytesOut, grpc] of samples) {
    metrics.record(tcp, { protocol: grpc === undefined ? 'http' : 'grpc', flag, status, grpcStatus: grpc ?? '' }, ms, bytesIn, bytesOut);
    const l: RequestLabels = { ...tcp, request_protocol: grpc === undefined ? 'http' : 'grpc', response_flags: flag, response_code: String(status), grpc_response_status: grpc ?? '' };
    requests.inc(l);
    duration.observe(l, ms);
    requestBytes.observe(l, bytesIn);
    responseBytes.observe(l, bytesOut);
  }
  const [mineText, theirText] = [await ours.metrics(), await theirs.metrics()];
  for (const name of ['istio_requests_total', 'istio_request_duration_milliseconds', 'istio_request_bytes', 'istio_response_bytes']) {
    const mine = normalized(mineText, name);
    assert.ok(mine.length > 0, name);
    assert.deepEqual(mine, normalized(theirText, name), name);
  }
  // Five series: client 200, 503 and 404; other 200 (http) and 200 (grpc).
  assert.equal(normalized(mineText, 'istio_requests_total').length, 5);
  // reset() (the registry's resetMetrics) starts every series again.
  ours.resetMetrics();
  metrics.record(a, { protocol: 'http', flag: '-', status: 200, grpcStatus: '' }, 1, 1, 1);
  assert.deepEqual(
    normalized(await ours.metrics(), 'istio_requests_total').map((l) => l.split(' ')[1]),
    ['1'],
  );
});
