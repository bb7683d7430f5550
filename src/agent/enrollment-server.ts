/**
 * The agent's enrollment endpoint (src/runtime/enrollment.ts has the wire and the client): a
 * Unix socket in the agent's run folder, reachable by root only, where a runtime hands over a new
 * pod and waits until the agent has captured, verified and configured it. It also marks the run
 * folder as taken: a second agent for the same node finds the socket answering and stops.
 */
import { createServer, request, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { chmod, mkdir, rm, rmdir, stat } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join, normalize } from 'node:path';

import { ENROLL_SOCKET, MAX_ENROLL_TIMEOUT_MS, agentAnswers, type CniPod, type CniRef, type EnrollAnswer, type EnrollErrorBody, type EnrollPod } from '../runtime/enrollment.js';
import { NodemeshError, isNodemeshError, type ErrorCode } from '../shared/errors.js';
import { logger } from '../shared/log.js';
import { DNS_LABEL, DNS_SUBDOMAIN, UUID } from '../shared/names.js';
import { checkPodFields, PodFieldInvalid, type PodEdge } from './pods/validate.js';
import { listenUnix } from '../shared/http.js';
import { ENROLL_SOCKET_NEXT, type BeginAnswer } from './handover.js';

const log = logger('enrollment');

const MAX_BODY_BYTES = 64 * 1024;

/** What the endpoint needs of the agent. */
export interface EnrollTarget {
  /**
   * Takes the pod and resolves once it is enrolled, verified and configured (or left alone by
   * the mesh's enrollment settings); rejects with a NodemeshError. `signal` aborts when the caller
   * hangs up or the deadline passes.
   */
  enrollAnnounced(pod: EnrollPod, deadline: number, signal: AbortSignal): Promise<EnrollAnswer>;
  /** The pod is about to stop: it is no endpoint from now on (resolves once that is published). */
  drain(uid: string): Promise<void>;
  /** The CNI plugin's ADD: completes the pod from the pod source, then as enrollAnnounced. */
  enrollCni(pod: CniPod, deadline: number, signal: AbortSignal): Promise<EnrollAnswer>;
  /** The CNI plugin's CHECK: the pod is enrolled and verified (or left alone by the mesh), else a NodemeshError. */
  checkCni(ref: CniRef): Promise<EnrollAnswer>;
  /** The CNI plugin's DEL: as drain, by name when the runtime gives no uid. */
  releaseCni(ref: CniRef): Promise<void>;
  /** A new agent asks for the node (src/agent/handover.ts); rejects with a NodemeshError to refuse. */
  handoverBegin(request: unknown): Promise<BeginAnswer>;
  /** The new agent serves the node now. */
  handoverCommit(): Promise<void>;
  /** The new agent gave up. */
  handoverAbort(): Promise<void>;
  /** During a handover, the old agent's listener accepted this agent's capture probe for the pod. */
  probeArrived(uid: string): void;
}

/** What a request held during a handover does once it is over: forwarded to the new agent, or served here. */
export type HoldOutcome = 'committed' | 'thawed';

const cniBad = (field: string, message: string): NodemeshError => new NodemeshError('NM_ERR_ENROLL_FAILED', `pod.${field}: ${message}`, { context: { field: `pod.${field}` } });

/** A field of a CNI request: a string ("" for a missing optional one). */
function cniString(p: Record<string, unknown>, field: string, optional = false): string {
  const v = p[field] ?? (optional ? '' : undefined);
  if (typeof v !== 'string') throw cniBad(field, 'must be a string');
  return v;
}

/** The pod a CNI CHECK or DEL names, checked before the agent looks anything up with it. */
export function checkCniRef(value: unknown): CniRef {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw cniBad('', 'must be an object');
  const p = value as Record<string, unknown>;
  const namespace = cniString(p, 'namespace');
  if (!DNS_LABEL.test(namespace)) throw cniBad('namespace', `"${namespace}" is not a DNS-1123 label`);
  const name = cniString(p, 'name');
  if (name.length > 253 || !DNS_SUBDOMAIN.test(name)) throw cniBad('name', `"${name}" is not a DNS-1123 subdomain`);
  const uid = cniString(p, 'uid', true);
  if (uid !== '' && !UUID.test(uid)) throw cniBad('uid', `"${uid}" is not a UUID`);
  return { namespace, name, ...(uid === '' ? {} : { uid }) };
}

/** A CNI ADD's pod: the reference, its netns path and the addresses the network plugin gave it. */
export function checkCniPod(value: unknown): CniPod {
  const ref = checkCniRef(value);
  const p = value as Record<string, unknown>;
  const netnsPath = cniString(p, 'netnsPath');
  if (!isAbsolute(netnsPath) || normalize(netnsPath) !== netnsPath) throw cniBad('netnsPath', `"${netnsPath}" is not an absolute, normalised path`);
  return { ...ref, netnsPath, ip4: cniString(p, 'ip4', true), ip6: cniString(p, 'ip6', true), containerId: cniString(p, 'containerId', true) };
}

/** Checks a handed-over pod at this edge (fields, then the netns and cgroup as they are now). */
export async function validateEnrollPod(value: unknown, edge: PodEdge): Promise<EnrollPod> {
  let pod: EnrollPod;
  try {
    pod = checkPodFields(value, edge);
  } catch (e) {
    if (!(e instanceof PodFieldInvalid)) throw e;
    throw new NodemeshError('NM_ERR_ENROLL_FAILED', `pod.${e.message}`, { context: { field: `pod.${e.field}` } });
  }
  await checkNetns(pod.netnsPath);
  const cg = await stat(pod.cgroupPath).catch(() => undefined);
  if (!cg?.isDirectory()) throw new NodemeshError('NM_ERR_ENROLL_FAILED', `pod.cgroupPath: ${pod.cgroupPath} does not exist`, { context: { field: 'pod.cgroupPath' } });
  return pod;
}

/** A handed-over pod's network namespace exists, and is not the agent's own (the host's). */
async function checkNetns(path: string): Promise<void> {
  const bad = (message: string): NodemeshError => new NodemeshError('NM_ERR_ENROLL_FAILED', `pod.netnsPath: ${message}`, { context: { field: 'pod.netnsPath' } });
  const [podNs, ownNs] = await Promise.all([stat(path).catch(() => undefined), stat('/proc/self/ns/net')]);
  if (!podNs) throw bad(`${path} does not exist`);
  if (podNs.ino === ownNs.ino && podNs.dev === ownNs.dev) throw bad(`${path} is the agent's own network namespace`);
}

export class EnrollmentServer {
  /** A handover is under way: enrollment requests wait for its outcome. */
  private held: Promise<HoldOutcome> | undefined;

  private constructor(
    private readonly server: Server,
    private socketPath: string,
  ) {}

  /**
   * Listens on <runDir>/enroll.sock; fails if another agent answers there. `next`: a new agent
   * taking the node over listens on enroll.sock.new until commit (see moved()).
   */
  static async start(runDir: string, edge: PodEdge, target: EnrollTarget, options: { next?: boolean } = {}): Promise<EnrollmentServer> {
    const socketPath = join(runDir, options.next ? ENROLL_SOCKET_NEXT : ENROLL_SOCKET);
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
    if (!options.next && (await agentAnswers(socketPath))) {
      throw new NodemeshError('NM_ERR_AGENT_RUNNING', `another agent already serves this node (its enrollment socket ${socketPath} answers)`, {
        context: { path: socketPath },
        hint: 'stop that agent first; one agent per node',
      });
    }
    let self: EnrollmentServer | undefined;
    const server = createServer((req, res) => void handle(req, res, edge, target, () => self?.held, runDir));
    // Any socket there was left by an agent that died.
    await listenUnix(server, socketPath);
    log.info({ path: socketPath }, 'enrollment endpoint listening');
    self = new EnrollmentServer(server, socketPath);
    return self;
  }

  /** Enrollment requests wait until `outcome` settles (a handover under way). */
  hold(outcome: Promise<HoldOutcome>): void {
    this.held = outcome;
    void outcome.then(() => {
      if (this.held === outcome) this.held = undefined;
    });
  }

  /** The socket was renamed (a new agent's enroll.sock.new, at commit). */
  moved(path: string): void {
    this.socketPath = path;
  }

  /** Stops answering, leaving the socket file alone (it is the next agent's now). */
  async closeHandedOver(): Promise<void> {
    await new Promise<void>((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
    await rm(this.socketPath, { force: true });
    // The run folder goes too when nothing else is in it, and the runtime's nodes/ folder above
    // it when no other node's agent runs (the runtime removes its state folder once it is empty).
    const runDir = dirname(this.socketPath);
    await rmdir(runDir).catch(() => undefined);
    if (basename(dirname(runDir)) === 'nodes') await rmdir(dirname(runDir)).catch(() => undefined);
  }
}

function reply(res: ServerResponse, status: number, body: EnrollAnswer | EnrollErrorBody | BeginAnswer | Record<string, never>): void {
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

/** The new agent's endpoint, once a handover committed: a held request goes there. */
async function forward(runDir: string, req: IncomingMessage, res: ServerResponse, body: string | undefined): Promise<void> {
  // The new agent renames its socket over enroll.sock right after the commit.
  for (const path of [join(runDir, ENROLL_SOCKET_NEXT), join(runDir, ENROLL_SOCKET)]) {
    const done = await new Promise<boolean>((resolve) => {
      const out = request({ socketPath: path, agent: false, method: req.method, path: req.url, headers: { 'content-type': 'application/json', ...(body === undefined ? {} : { 'content-length': Buffer.byteLength(body) }) } }, (answer) => {
        res.writeHead(answer.statusCode ?? 502, answer.headers);
        answer.pipe(res);
        resolve(true);
      });
      out.on('error', () => resolve(false));
      out.end(body);
    });
    if (done) return;
  }
  fail(res, 503, 'NM_ERR_ENROLL_FAILED', 'this node was handed over to a new agent, which does not answer', { hint: 'try again in a moment' });
}

async function handleHandover(req: IncomingMessage, res: ServerResponse, target: EnrollTarget): Promise<void> {
  const text = await readBody(req).catch(() => undefined);
  let body: unknown;
  try {
    body = text === undefined || text === '' ? {} : JSON.parse(text);
  } catch {
    fail(res, 400, 'NM_ERR_AGENT_RUNNING', 'the request body is not JSON');
    return;
  }
  try {
    if (req.url === '/v1/handover/begin') {
      reply(res, 200, await target.handoverBegin(body));
      return;
    }
    if (req.url === '/v1/handover/commit') await target.handoverCommit();
    else if (req.url === '/v1/handover/abort') await target.handoverAbort();
    else {
      const uid = (body as { uid?: unknown }).uid;
      if (typeof uid !== 'string' || !UUID.test(uid)) throw new NodemeshError('NM_ERR_AGENT_RUNNING', 'uid must be a pod uid');
      target.probeArrived(uid);
    }
    reply(res, 200, {});
  } catch (e) {
    const err = isNodemeshError(e) ? e : new NodemeshError('NM_ERR_AGENT_RUNNING', (e as Error).message);
    fail(res, 409, err.code, err.message, err.hint ? { hint: err.hint } : {});
  }
}

async function handle(req: IncomingMessage, res: ServerResponse, edge: PodEdge, target: EnrollTarget, held: () => Promise<HoldOutcome> | undefined, runDir: string): Promise<void> {
  if (req.method === 'POST' && /^\/v1\/handover\/(begin|commit|abort|probe)$/.test(req.url ?? '')) {
    await handleHandover(req, res, target);
    return;
  }
  const hold = held();
  if (hold !== undefined && (await hold) === 'committed') {
    const body = req.method === 'POST' ? await readBody(req).catch(() => undefined) : undefined;
    await forward(runDir, req, res, body);
    return;
  }
  // DELETE /v1/pods/<uid>: the runtime is about to stop the pod's processes (as Kubernetes takes
  // a terminating pod out of its Services' endpoints before its containers get SIGTERM).
  const uid = /^\/v1\/pods\/([^/]+)$/.exec(req.url ?? '')?.[1];
  if (req.method === 'DELETE' && uid !== undefined && UUID.test(uid)) {
    await target.drain(uid);
    res.writeHead(204).end();
    return;
  }
  const cni = req.url === '/v1/cni/pods' || req.url === '/v1/cni/check' || req.url === '/v1/cni/release';
  if (req.method !== 'POST' || (req.url !== '/v1/pods' && !cni)) {
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
  if (req.url === '/v1/cni/check' || req.url === '/v1/cni/release') {
    try {
      const ref = checkCniRef(request);
      if (req.url === '/v1/cni/release') {
        await target.releaseCni(ref);
        res.writeHead(204).end();
      } else reply(res, 200, await target.checkCni(ref));
    } catch (e) {
      const err = isNodemeshError(e) ? e : new NodemeshError('NM_ERR_ENROLL_FAILED', (e as Error).message);
      fail(res, 409, err.code, err.message, { ...(err.hint ? { hint: err.hint } : {}), ...(err.context.field ? { detail: err.context.field } : {}) });
    }
    return;
  }
  const timeoutMs = request.timeoutMs;
  if (typeof timeoutMs !== 'number' || !Number.isInteger(timeoutMs) || timeoutMs < 1 || timeoutMs > MAX_ENROLL_TIMEOUT_MS) {
    fail(res, 400, 'NM_ERR_ENROLL_FAILED', `timeoutMs must be a whole number of milliseconds from 1 to ${MAX_ENROLL_TIMEOUT_MS}`, { detail: String(timeoutMs) });
    return;
  }
  let pod: EnrollPod | CniPod;
  try {
    if (cni) {
      pod = checkCniPod(request.pod);
      await checkNetns(pod.netnsPath);
    } else pod = await validateEnrollPod(request.pod, edge);
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
    const answer = 'cgroupPath' in pod ? await target.enrollAnnounced(pod, deadline, abort.signal) : await target.enrollCni(pod, deadline, abort.signal);
    reply(res, 200, answer);
  } catch (e) {
    const err = isNodemeshError(e) ? e : new NodemeshError('NM_ERR_ENROLL_FAILED', (e as Error).message);
    fail(res, err.code === 'NM_ERR_ENROLL_TIMEOUT' ? 504 : 500, err.code, err.message, { ...(err.hint ? { hint: err.hint } : {}), ...(err.context.detail ? { detail: err.context.detail } : {}) });
  } finally {
    clearTimeout(timer);
  }
}
