/**
 * An HTTP/2 (h2c, prior knowledge) client for L7 tests, run inside a pod: one session to
 * host:port, the plan's requests in order on it, and one JSON line: each answer's status,
 * x-served-by, the x-body-sha256 the server read, the sha256 of the body sent, and its time.
 * Plan: {host, port, requests: [{path, body?: bytes}]}.
 */
import { createHash, randomBytes } from 'node:crypto';
import { connect } from 'node:http2';

export interface H2Plan {
  readonly host: string;
  readonly port: number;
  readonly requests: ReadonlyArray<{ readonly path: string; readonly body?: number }>;
}

export interface H2Answer {
  readonly status: number;
  readonly servedBy: string;
  readonly received: string;
  readonly sent?: string;
  readonly ms: number;
  readonly error?: string;
}

const plan = JSON.parse(process.argv[2] ?? '{}') as H2Plan;
const session = connect(`http://${plan.host}:${plan.port}`);
session.on('error', () => undefined);
const answers: H2Answer[] = [];
for (const r of plan.requests) {
  const body = r.body === undefined ? undefined : randomBytes(r.body);
  const started = performance.now();
  answers.push(
    await new Promise<H2Answer>((resolve) => {
      const req = session.request({ ':method': body ? 'POST' : 'GET', ':path': r.path }, { endStream: body === undefined });
      const sent = body ? { sent: createHash('sha256').update(body).digest('hex') } : {};
      let status = 0;
      let servedBy = '';
      let received = '';
      req.on('response', (h) => {
        status = Number(h[':status'] ?? 0);
        servedBy = String(h['x-served-by'] ?? '');
        received = String(h['x-body-sha256'] ?? '');
      });
      req.on('data', () => undefined);
      req.on('end', () => resolve({ status, servedBy, received, ...sent, ms: performance.now() - started }));
      req.on('error', (e: Error) => resolve({ status, servedBy, received, ...sent, ms: performance.now() - started, error: e.message }));
      if (body) req.end(body);
    }),
  );
}
session.close();
process.stdout.write(`${JSON.stringify({ answers })}\n`);
