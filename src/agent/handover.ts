/**
 * The node handed from one agent to the next with no gap (a DaemonSet rolling with maxSurge: 1;
 * ARCHITECTURE.md, "Agent handover"). The new agent finds the old one answering on enroll.sock
 * and, on that socket (root only):
 *
 *   POST /v1/handover/begin  {protocol, pid, socket}  the old agent freezes (no reconcile, no
 *        enrollment, its control plane stream closed) and sends copies of every in-pod listening
 *        socket to `socket` (SCM_RIGHTS); it answers with the pods it had verified.
 *   POST /v1/handover/commit  the new agent serves every pod: the old one stops accepting,
 *        closes its host ports and enrollment endpoint, and drains what it holds.
 *   POST /v1/handover/abort   the new agent gives up: the old one thaws and carries on.
 *
 * The new agent listens on enroll.sock.new meanwhile (the old one forwards capture probes that
 * its listeners accepted there) and renames it over enroll.sock at commit. The old agent thaws by
 * itself if the new one dies, or after HANDOVER_THAW_MS without a commit.
 */
import { request } from 'node:http';
import { rename, rm } from 'node:fs/promises';
import { join } from 'node:path';

import { closeFd, fdsListen, fdsReceive, fdsSend, type FdMessage } from '../datapath/native.js';
import { handoverBegun, inherit, netnsId, type ListenerRef, type NetnsId } from '../proxy/listen-sockets.js';
import { agentAnswers, ENROLL_SOCKET } from '../runtime/enrollment.js';
import { NodemeshError } from '../shared/errors.js';
import { logger } from '../shared/log.js';

const log = logger('handover');

/** The wire between two agents of a node; an agent refuses a begin of another protocol. */
export const HANDOVER_PROTOCOL = 1;
/** The new agent's enrollment socket until commit. */
export const ENROLL_SOCKET_NEXT = `${ENROLL_SOCKET}.new`;
/** The old agent thaws after this long without a commit. */
export const HANDOVER_THAW_MS = 30_000;
/** The new agent gives up (and aborts) when it cannot commit within this long. */
export const HANDOVER_COMMIT_MS = 20_000;

/** The begin request: who asks and where the sockets go. */
export interface BeginRequest {
  readonly protocol: number;
  readonly pid: number;
  /** A SOCK_SEQPACKET socket in the run folder (handover-<pid>.sock). */
  readonly socket: string;
}

export interface BeginAnswer {
  readonly protocol: number;
  readonly pid: number;
  /** The pods the old agent had verified (the new one must verify them before it commits). */
  readonly verified: ReadonlyArray<string>;
}

/** One pod's listening sockets, as sent with its fds. */
interface PodSockets {
  readonly uid: string;
  readonly netns: NetnsId;
  readonly listeners: ReadonlyArray<ListenerRef>;
}

/** The running agent's answer to a begin it will not take. */
export const handoverRefused = (message: string): NodemeshError => new NodemeshError('NM_ERR_AGENT_RUNNING', `handover refused: ${message}`, { hint: 'stop the running agent first (or let the DaemonSet roll)' });

/** Checks a begin request at the old agent; the socket must be a handover socket of its run folder. */
export function checkBeginRequest(value: unknown, runDir: string): BeginRequest {
  if (typeof value !== 'object' || value === null) throw handoverRefused('the request is not an object');
  const r = value as Record<string, unknown>;
  if (r['protocol'] !== HANDOVER_PROTOCOL) throw handoverRefused(`handover protocol ${String(r['protocol'])} is not this agent's (${HANDOVER_PROTOCOL})`);
  const pid = r['pid'];
  if (typeof pid !== 'number' || !Number.isInteger(pid) || pid < 1) throw handoverRefused('pid must be a process id');
  const socket = r['socket'];
  if (socket !== join(runDir, `handover-${pid}.sock`)) throw handoverRefused(`socket must be ${join(runDir, `handover-${pid}.sock`)}`);
  return { protocol: HANDOVER_PROTOCOL, pid, socket };
}

/** The old agent: sends copies of the listening sockets of each pod, one message per pod. */
export function sendSockets(socket: string, pods: ReadonlyArray<{ readonly uid: string; readonly netnsPath: string; readonly listeners: ReadonlyArray<ListenerRef & { readonly fd: number }> }>): number {
  const messages: FdMessage[] = [];
  let count = 0;
  for (const p of pods) {
    let netns: NetnsId;
    try {
      netns = netnsId(p.netnsPath);
    } catch {
      continue; // the pod is going away
    }
    const body: PodSockets = { uid: p.uid, netns, listeners: p.listeners.map((l) => ({ host: l.host, port: l.port })) };
    messages.push({ data: JSON.stringify(body), fds: p.listeners.map((l) => l.fd) });
    count += p.listeners.length;
  }
  messages.push({ data: JSON.stringify({ done: true, pods: messages.length }), fds: [] });
  fdsSend(socket, messages, 2000);
  return count;
}

/** POSTs JSON to an agent's socket; resolves with the status and the parsed body. */
export function postJson(socketPath: string, path: string, body: unknown, timeoutMs: number): Promise<{ status: number; body: unknown }> {
  const text = JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, agent: false, method: 'POST', path, timeout: timeoutMs, headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) } }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const raw = Buffer.concat(chunks).toString('utf8');
        let parsed: unknown = raw;
        try {
          parsed = raw === '' ? undefined : JSON.parse(raw);
        } catch {
          // not JSON: kept as text
        }
        resolve({ status: res.statusCode ?? 0, body: parsed });
      });
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`no answer from ${socketPath} within ${timeoutMs} ms`)));
    req.on('error', reject);
    req.end(text);
  });
}

function errorOf(body: unknown): string {
  const e = (body as { error?: { message?: unknown } } | undefined)?.error;
  return typeof e?.message === 'string' ? e.message : JSON.stringify(body);
}

/**
 * The new agent: asks the agent answering on enroll.sock to hand the node over, and takes the
 * listening sockets it sends (kept for the pods' listeners, see listen-sockets.ts). Throws
 * NM_ERR_AGENT_RUNNING when the running agent refuses (an older one without handover, another
 * handover under way).
 */
export async function beginHandover(runDir: string): Promise<BeginAnswer> {
  const socket = join(runDir, `handover-${process.pid}.sock`);
  const running = join(runDir, ENROLL_SOCKET);
  const listenFd = fdsListen(socket);
  // The old agent accepts on the sockets it sends until the commit; this one only after it.
  handoverBegun();
  try {
    const received = fdsReceive(listenFd, 10_000);
    // The old agent sends before it answers: an answer that refuses means nothing comes.
    received.catch(() => undefined);
    const answer = await postJson(running, '/v1/handover/begin', { protocol: HANDOVER_PROTOCOL, pid: process.pid, socket } satisfies BeginRequest, 10_000).catch((e: Error) => {
      throw new NodemeshError('NM_ERR_AGENT_RUNNING', `another agent serves this node and the handover request failed: ${e.message}`, { context: { path: running }, hint: 'stop that agent first' });
    });
    if (answer.status !== 200) {
      throw new NodemeshError('NM_ERR_AGENT_RUNNING', `another agent serves this node and refused to hand it over (${answer.status}): ${errorOf(answer.body)}`, {
        context: { path: running },
        hint: 'stop that agent first; one agent per node',
      });
    }
    const begun = answer.body as BeginAnswer;
    const { peerPid, messages } = await received;
    let sockets = 0;
    for (const m of messages) {
      const body = JSON.parse(m.data) as Partial<PodSockets> & { done?: boolean };
      if (body.done) continue;
      const { netns, listeners } = body as PodSockets;
      m.fds.forEach((fd, i) => {
        const ref = listeners[i];
        if (ref) inherit(netns, ref, fd);
        else closeFd(fd);
      });
      sockets += m.fds.length;
    }
    log.info({ from: begun.pid, senderPid: peerPid, pods: messages.length - 1, sockets, verified: begun.verified.length }, 'handover begun: listening sockets received');
    return begun;
  } finally {
    closeFd(listenFd);
    await rm(socket, { force: true });
  }
}

/** The new agent: the old one stops serving; enroll.sock is then the new agent's. */
export async function commitHandover(runDir: string): Promise<void> {
  const path = join(runDir, ENROLL_SOCKET);
  const answer = await postJson(path, '/v1/handover/commit', {}, 10_000).catch(async (e: Error) => {
    // The old agent stopped meanwhile (it left the sockets and maps alone): the node is ours as it is.
    if (!(await agentAnswers(path))) return { status: 200, body: undefined };
    throw new NodemeshError('NM_ERR_AGENT_RUNNING', `the running agent did not take the commit: ${e.message}`);
  });
  if (answer.status !== 200) throw new NodemeshError('NM_ERR_AGENT_RUNNING', `the running agent refused the commit (${answer.status}): ${errorOf(answer.body)}`);
  await rename(join(runDir, ENROLL_SOCKET_NEXT), join(runDir, ENROLL_SOCKET));
}

/** The new agent gives up: the old one carries on (best effort: it also thaws by itself). */
export async function abortHandover(runDir: string): Promise<void> {
  await postJson(join(runDir, ENROLL_SOCKET), '/v1/handover/abort', {}, 2000).catch((e: Error) => log.warn({ err: e.message }, 'the running agent could not be told the handover is off; it thaws by itself'));
}
