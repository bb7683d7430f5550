/**
 * The agent's enrollment endpoint (src/runtime/enrollment.ts has the wire and the client): a
 * Unix socket in the agent's run folder, reachable by root only, where a runtime hands over a new
 * pod and waits until the agent has captured, verified and configured it. It also marks the run
 * folder as taken: a second agent for the same node finds the socket answering and stops.
 */
import { connect } from 'node:net';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { chmod, mkdir, rm, stat } from 'node:fs/promises';
import { isAbsolute, join, normalize, relative } from 'node:path';
import { isIPv4, isIPv6 } from 'node:net';

import { ENROLL_SOCKET, MAX_ENROLL_TIMEOUT_MS, type EnrollAnswer, type EnrollErrorBody, type EnrollPod } from '../runtime/enrollment.js';
import { NodemeshError, isNodemeshError, type ErrorCode } from '../shared/errors.js';
import { logger } from '../shared/log.js';

const log = logger('enrollment');

const MAX_BODY_BYTES = 64 * 1024;
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const DNS_LABEL = /^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/;

/** What the endpoint needs of the agent. */
export interface EnrollTarget {
  /**
   * Takes the pod and resolves once it is enrolled, verified and configured (or left alone by
   * the mesh's enrollment settings); rejects with a NodemeshError. `signal` aborts when the caller
   * hangs up or the deadline passes.
   */
  enrollAnnounced(pod: EnrollPod, deadline: number, signal: AbortSignal): Promise<EnrollAnswer>;
}

export interface EnrollmentEdge {
  /** cgroups of this node's pods live under it. */
  readonly podsCgroup: string;
}

/** Checks a handed-over pod at this edge; a NodemeshError naming the field otherwise. */
export async function validateEnrollPod(value: unknown, edge: EnrollmentEdge): Promise<EnrollPod> {
  const bad = (field: string, message: string): NodemeshError => new NodemeshError('NM_ERR_ENROLL_FAILED', `pod.${field}: ${message}`, { context: { field: `pod.${field}` } });
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw bad('', 'must be an object');
  const p = value as Record<string, unknown>;
  const str = (field: string): string => {
    const v = p[field];
    if (typeof v !== 'string') throw bad(field, 'must be a string');
    return v;
  };
  const uid = str('uid');
  if (!UUID.test(uid)) throw bad('uid', `"${uid}" is not a UUID`);
  const name = str('name');
  const namespace = str('namespace');
  const serviceAccount = str('serviceAccount');
  for (const [field, v] of [['name', name], ['namespace', namespace], ['serviceAccount', serviceAccount]] as const) if (!DNS_LABEL.test(v)) throw bad(field, `"${v}" is not a DNS-1123 label`);
  const ip4 = str('ip4');
  if (!isIPv4(ip4)) throw bad('ip4', `"${ip4}" is not an IPv4 address`);
  const ip6 = str('ip6');
  if (!isIPv6(ip6)) throw bad('ip6', `"${ip6}" is not an IPv6 address`);
  const labels = p['labels'];
  if (typeof labels !== 'object' || labels === null || Array.isArray(labels)) throw bad('labels', 'must be an object of strings');
  for (const [k, v] of Object.entries(labels)) if (typeof v !== 'string' || k.length === 0 || k.length > 317) throw bad(`labels["${k}"]`, 'must be a string');
  const netnsPath = str('netnsPath');
  const cgroupPath = str('cgroupPath');
  for (const [field, path] of [['netnsPath', netnsPath], ['cgroupPath', cgroupPath]] as const) {
    if (!isAbsolute(path) || normalize(path) !== path) throw bad(field, `"${path}" is not an absolute, normalised path`);
  }
  const under = relative(edge.podsCgroup, cgroupPath);
  if (under === '' || under.startsWith('..') || isAbsolute(under)) throw bad('cgroupPath', `"${cgroupPath}" is not under this node's pod cgroups (${edge.podsCgroup})`);
  const [podNs, ownNs, cg] = await Promise.all([stat(netnsPath).catch(() => undefined), stat('/proc/self/ns/net'), stat(cgroupPath).catch(() => undefined)]);
  if (!podNs) throw bad('netnsPath', `${netnsPath} does not exist`);
  // The agent's own (the host's) network namespace is never a pod's.
  if (podNs.ino === ownNs.ino && podNs.dev === ownNs.dev) throw bad('netnsPath', `${netnsPath} is the agent's own network namespace`);
  if (!cg?.isDirectory()) throw bad('cgroupPath', `${cgroupPath} does not exist`);
  return Object.freeze({ uid, name, namespace, serviceAccount, labels: Object.freeze({ ...(labels as Record<string, string>) }), ip4, ip6, netnsPath, cgroupPath });
}

export class EnrollmentServer {
  private constructor(
    private readonly server: Server,
    readonly socketPath: string,
  ) {}

  /** Listens on <runDir>/enroll.sock; fails if another agent answers there. */
  static async start(runDir: string, edge: EnrollmentEdge, target: EnrollTarget): Promise<EnrollmentServer> {
    const socketPath = join(runDir, ENROLL_SOCKET);
    try {
      await mkdir(runDir, { recursive: true, mode: 0o700 });
      await chmod(runDir, 0o700);
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', `the agent's run folder ${runDir} cannot be made: ${err.code ?? err.message}`, {
        context: { field: 'run-dir', path: runDir, ...(err.code ? { errnoCode: err.code } : {}) },
        hint: 'give --run-dir a folder root can create (or set NODEMESH_STATE_DIR to one)',
      });
    }
    if (await answers(socketPath)) {
      throw new NodemeshError('NM_ERR_AGENT_RUNNING', `another agent already serves this node (its enrollment socket ${socketPath} answers)`, {
        context: { path: socketPath },
        hint: 'stop that agent first; one agent per node',
      });
    }
    // A socket left by an agent that died.
    await rm(socketPath, { force: true });
    const server = createServer((req, res) => void handle(req, res, edge, target));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(socketPath, () => resolve());
    });
    await chmod(socketPath, 0o600);
    log.info({ path: socketPath }, 'enrollment endpoint listening');
    return new EnrollmentServer(server, socketPath);
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
    await rm(this.socketPath, { force: true });
  }
}

function answers(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(socketPath);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

function reply(res: ServerResponse, status: number, body: EnrollAnswer | EnrollErrorBody): void {
  if (res.writableEnded || res.destroyed) return;
  const text = JSON.stringify(body) + '\n';
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) }).end(text);
}

function fail(res: ServerResponse, status: number, code: ErrorCode, message: string, extra: { hint?: string; detail?: string } = {}): void {
  reply(res, status, { error: { code, message, ...extra } });
}

async function readBody(req: IncomingMessage): Promise<string | undefined> {
  let size = 0;
  const chunks: Buffer[] = [];
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > MAX_BODY_BYTES) return undefined;
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

async function handle(req: IncomingMessage, res: ServerResponse, edge: EnrollmentEdge, target: EnrollTarget): Promise<void> {
  if (req.method !== 'POST' || req.url !== '/v1/pods') {
    fail(res, 404, 'NM_ERR_ENROLL_FAILED', `no such endpoint: ${req.method} ${req.url}`);
    return;
  }
  const text = await readBody(req).catch(() => undefined);
  if (text === undefined) {
    fail(res, 400, 'NM_ERR_ENROLL_FAILED', `the request body is missing or larger than ${MAX_BODY_BYTES} bytes`);
    return;
  }
  let request: { pod?: unknown; timeoutMs?: unknown };
  try {
    request = JSON.parse(text) as typeof request;
  } catch {
    fail(res, 400, 'NM_ERR_ENROLL_FAILED', 'the request body is not JSON');
    return;
  }
  const timeoutMs = request.timeoutMs;
  if (typeof timeoutMs !== 'number' || !Number.isInteger(timeoutMs) || timeoutMs < 1 || timeoutMs > MAX_ENROLL_TIMEOUT_MS) {
    fail(res, 400, 'NM_ERR_ENROLL_FAILED', `timeoutMs must be a whole number of milliseconds from 1 to ${MAX_ENROLL_TIMEOUT_MS}`, { detail: String(timeoutMs) });
    return;
  }
  let pod: EnrollPod;
  try {
    pod = await validateEnrollPod(request.pod, edge);
  } catch (e) {
    const err = e as NodemeshError;
    log.warn({ err: err.message, field: err.context.field }, 'enrollment request refused');
    fail(res, 400, err.code, err.message, { detail: err.context.field ?? '' });
    return;
  }
  const abort = new AbortController();
  const deadline = Date.now() + timeoutMs;
  const timer = setTimeout(() => abort.abort(), timeoutMs);
  // The runtime gave up (or died): stop waiting for it.
  res.once('close', () => abort.abort());
  try {
    const answer = await target.enrollAnnounced(pod, deadline, abort.signal);
    reply(res, 200, answer);
  } catch (e) {
    const err = isNodemeshError(e) ? e : new NodemeshError('NM_ERR_ENROLL_FAILED', (e as Error).message);
    fail(res, err.code === 'NM_ERR_ENROLL_TIMEOUT' ? 504 : 500, err.code, err.message, { ...(err.hint ? { hint: err.hint } : {}), ...(err.context.detail ? { detail: err.context.detail } : {}) });
  } finally {
    clearTimeout(timer);
  }
}
