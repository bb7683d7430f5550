/**
 * The node agent's enrollment endpoint, as a runtime sees it (design.md section 2): before a new
 * pod's command runs, the runtime hands the pod over (identity, netns, cgroup) and waits until the
 * agent has captured it, proven the capture and holds the pod's config, or refused. This is what
 * keeps a pod's first connection from leaving the mesh (Istio's CNI plugin does the same for
 * ztunnel). `nodemesh pod run` (LocalPodRuntime.start) calls it; the Kubernetes CNI plugin will
 * call the same endpoint.
 *
 * Wire: HTTP/1.1 over a Unix socket that only root can reach (the folder is 0700).
 *   POST /v1/pods  {"pod": EnrollPod, "timeoutMs": n}
 *     200 {"enrolled": true, "verified": true}                       captured, verified, configured
 *     200 {"enrolled": false, "reason": "..."}                        the mesh leaves this pod alone
 *     4xx/5xx {"error": {"code": "NM_ERR_...", "message": "...", ...}} refused, or not in time
 */
import { request } from 'node:http';
import { connect } from 'node:net';
import { join } from 'node:path';

import type { Workload } from '../config/snapshot.js';
import { NodemeshError, type ErrorCode } from '../shared/errors.js';

/** The run folder (enrollment socket) of a node's agent, for the runtime keeping its state in stateDir. */
export function agentRunDir(stateDir: string, node: string): string {
  return join(stateDir, 'nodes', node);
}

export const ENROLL_SOCKET = 'enroll.sock';

/** How long a runtime waits for the agent by default (`pod run --enroll-timeout`). */
export const DEFAULT_ENROLL_TIMEOUT_MS = 30_000;
/** The most an enrollment request may ask the agent to wait. */
export const MAX_ENROLL_TIMEOUT_MS = 300_000;

/** A pod as the runtime hands it over: the workload and where its netns and cgroup are. */
export interface EnrollPod extends Workload {
  readonly netnsPath: string;
  readonly cgroupPath: string;
}

export interface EnrollRequest {
  readonly pod: EnrollPod;
  readonly timeoutMs: number;
}

/**
 * A pod as the CNI plugin (nodemesh-cni, on ADD) hands it over: what the runtime knows of it at
 * that moment (its name, network namespace and the addresses the network plugin gave it). The
 * agent completes it from the Pod object (identity, labels) and the node (its cgroup).
 *   POST /v1/cni/pods     {"pod": CniPod, "timeoutMs": n}   answers as POST /v1/pods
 *   POST /v1/cni/check    CniRef   200 {"enrolled": true, "verified": true} or an error body
 *   POST /v1/cni/release  CniRef   204 (DEL: the pod is going)
 */
export interface CniPod {
  /** K8S_POD_UID when the runtime passes it; otherwise the Pod object's. */
  readonly uid?: string;
  readonly namespace: string;
  readonly name: string;
  readonly netnsPath: string;
  /** From the network plugin's result: "" when the pod has none of that family. */
  readonly ip4: string;
  readonly ip6: string;
  readonly containerId?: string;
}

export interface CniRef {
  readonly uid?: string;
  readonly namespace: string;
  readonly name: string;
}

export type EnrollAnswer = { readonly enrolled: true; readonly verified: true } | { readonly enrolled: false; readonly reason: string };

export interface EnrollErrorBody {
  readonly error: { readonly code: ErrorCode; readonly message: string; readonly hint?: string; readonly detail?: string };
}

/** What happened: no agent on this node, or the agent's answer. */
export type HandOver = { readonly agent: false } | ({ readonly agent: true } & EnrollAnswer);

/**
 * Whether an agent listens on the enrollment socket at socketPath. No socket, or one an agent
 * left when it died (the connect is refused): no agent. Any other answer, or none within 2 s,
 * counts as an agent: neither a second agent nor `nodemesh cleanup` may take over a node from one
 * by mistake.
 */
export function agentAnswers(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(socketPath);
    const timer = setTimeout(() => {
      s.destroy();
      resolve(true);
    }, 2000);
    s.once('connect', () => {
      clearTimeout(timer);
      s.destroy();
      resolve(true);
    });
    s.once('error', (e: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      resolve(!['ENOENT', 'ENOTDIR', 'ECONNREFUSED'].includes(e.code ?? ''));
    });
  });
}

/**
 * Hands a new pod to the node's agent and waits for its answer, at most timeoutMs. No agent
 * listening (no socket, or a socket left by one that died): `{agent: false}` at once. A refusal
 * or no answer in time: a NodemeshError naming the pod.
 */
export async function handOverPod(runDir: string, pod: EnrollPod, timeoutMs: number, onAgent?: () => void): Promise<HandOver> {
  const socketPath = join(runDir, ENROLL_SOCKET);
  const body = JSON.stringify({ pod, timeoutMs } satisfies EnrollRequest);
  const context = { pod: pod.name, namespace: pod.namespace, path: socketPath };
  return new Promise<HandOver>((resolve, reject) => {
    let settled = false;
    const settle = (f: () => void): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      f();
    };
    // The agent bounds its own wait by timeoutMs; this one also covers an agent that hangs.
    const timer = setTimeout(() => {
      req.destroy();
      settle(() =>
        reject(
          new NodemeshError('NM_ERR_ENROLL_TIMEOUT', `the node agent did not capture pod ${pod.namespace}/${pod.name} within ${timeoutMs / 1000} s`, {
            context,
            hint: 'see the agent log and `nodemesh status`; give a longer --enroll-timeout if the node is busy',
          }),
        ),
      );
    }, timeoutMs + 1000);
    // agent: false: a connection of its own (Node's global agent would keep it alive and reuse it).
    const req = request({ socketPath, agent: false, method: 'POST', path: '/v1/pods', headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) } }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (text += d));
      res.on('error', (e) => settle(() => reject(transportError(pod, socketPath, e))));
      res.on('end', () =>
        settle(() => {
          let parsed: unknown;
          try {
            parsed = JSON.parse(text);
          } catch {
            reject(new NodemeshError('NM_ERR_ENROLL_FAILED', `the node agent answered the enrollment of pod ${pod.namespace}/${pod.name} with something that is not JSON (HTTP ${res.statusCode})`, { context: { ...context, detail: text.slice(0, 200) } }));
            return;
          }
          if (res.statusCode === 200) {
            resolve({ agent: true, ...(parsed as EnrollAnswer) });
            return;
          }
          const err = (parsed as Partial<EnrollErrorBody>).error;
          const timedOut = err?.code === 'NM_ERR_ENROLL_TIMEOUT';
          const code: ErrorCode = timedOut ? 'NM_ERR_ENROLL_TIMEOUT' : 'NM_ERR_ENROLL_FAILED';
          const what = timedOut ? `did not have pod ${pod.namespace}/${pod.name} in the mesh within ${timeoutMs / 1000} s` : `refused pod ${pod.namespace}/${pod.name}`;
          reject(
            new NodemeshError(code, `the node agent ${what}: ${err?.message ?? `HTTP ${res.statusCode}`}`, {
              context: { ...context, ...(err?.detail ? { detail: err.detail } : {}) },
              hint: err?.hint ?? 'see the agent log',
            }),
          );
        }),
      );
    });
    // An agent answers: from here on this may take a moment (the caller says so).
    req.once('socket', (socket) => socket.once('connect', () => onAgent?.()));
    req.on('error', (e: NodeJS.ErrnoException) => {
      // Nobody listens: no agent runs on this node (or one died and left its socket).
      if (e.code === 'ENOENT' || e.code === 'ECONNREFUSED') settle(() => resolve({ agent: false }));
      else settle(() => reject(transportError(pod, socketPath, e)));
    });
    req.end(body);
  });
}

function transportError(pod: EnrollPod, socketPath: string, e: Error): NodemeshError {
  return new NodemeshError('NM_ERR_ENROLL_FAILED', `the enrollment of pod ${pod.namespace}/${pod.name} was cut off: ${e.message}`, {
    context: { pod: pod.name, namespace: pod.namespace, path: socketPath },
    hint: 'the node agent may have stopped; see its log',
  });
}

/**
 * Tells the node's agent that the pod is about to stop, and waits (at most timeoutMs) until it is
 * no endpoint any more, so no new connection is sent to a pod whose processes are going away.
 * No agent, or one that does not answer in time: nothing to wait for.
 */
export async function drainPod(runDir: string, uid: string, timeoutMs = 2000): Promise<void> {
  await new Promise<void>((resolve) => {
    const req = request({ socketPath: join(runDir, ENROLL_SOCKET), agent: false, method: 'DELETE', path: `/v1/pods/${uid}`, timeout: timeoutMs }, (res) => {
      res.resume();
      res.on('end', () => resolve());
      res.on('error', () => resolve());
    });
    req.on('timeout', () => req.destroy());
    req.on('error', () => resolve());
    req.end();
  });
}
