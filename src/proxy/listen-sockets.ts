/**
 * The proxy's listening sockets inside pods (15001, 15006, 15008): made in the pod's netns, or
 * taken from the agent this one took the node over from (the surge handover, src/agent/handover.ts).
 * A socket taken over is the same kernel object the other agent listened on: nothing waiting in
 * its accept queue is lost, the port is never unbound, and sk_lookup's entries stay valid.
 */
import { statSync } from 'node:fs';

import { closeFd, listenInNetns } from '../datapath/native.js';
import { logger } from '../shared/log.js';

const log = logger('proxy');

/** A network namespace by its nsfs inode (the same whichever path names it). */
export interface NetnsId {
  readonly dev: number;
  readonly ino: number;
}

/** A listening socket as the handover names it. */
export interface ListenerRef {
  readonly host: string;
  readonly port: number;
}

export function netnsId(netnsPath: string): NetnsId {
  const st = statSync(netnsPath);
  return { dev: st.dev, ino: st.ino };
}

const key = (ns: NetnsId, host: string, port: number): string => `${ns.dev}:${ns.ino} ${host} ${port}`;

/** Sockets handed over and not taken yet, by netns, address and port. */
const inherited = new Map<string, number>();
/** Sockets handed over and taken by a listener: the old agent still accepts on them until the commit. */
const taken = new Set<number>();
/** Settles at the commit (or when the handover is off): from then on this agent accepts on what it took. */
let committed: { readonly promise: Promise<void>; readonly resolve: () => void } | undefined;

/** The handover begins: sockets handed over are accepted on only after handoverCommitted(). */
export function handoverBegun(): void {
  let resolve: () => void = () => undefined;
  const promise = new Promise<void>((r) => (resolve = r));
  committed = { promise, resolve };
}

/** The node is this agent's: listeners on sockets handed over start accepting. */
export function handoverCommitted(): void {
  committed?.resolve();
  committed = undefined;
  taken.clear();
}

/**
 * Starts accepting on a pod's listening socket: now, or at the commit for a socket handed over
 * (until then the old agent accepts on it; the connections wait in its queue meanwhile, not
 * refused). A capture probe of this agent accepted there is passed on by the old agent.
 */
export function acceptWhenOurs(fd: number, start: () => void): 'now' | 'at-commit' {
  if (committed && taken.has(fd)) {
    void committed.promise.then(start);
    return 'at-commit';
  }
  start();
  return 'now';
}

/** Keeps a socket handed over by the previous agent until a pod's listener asks for it. */
export function inherit(ns: NetnsId, ref: ListenerRef, fd: number): void {
  const k = key(ns, ref.host, ref.port);
  const before = inherited.get(k);
  if (before !== undefined) closeFd(before);
  inherited.set(k, fd);
}

/**
 * A listening TCP socket on host:port inside the pod's netns: the one handed over for it if there
 * is one, else a new one. The fd is the caller's.
 */
export async function listenInPodNetns(netnsPath: string, host: string, port: number): Promise<number> {
  if (inherited.size > 0) {
    let ns: NetnsId | undefined;
    try {
      ns = netnsId(netnsPath);
    } catch {
      // the pod is going away: listenInNetns says why
    }
    const k = ns && key(ns, host, port);
    const fd = k === undefined ? undefined : inherited.get(k);
    if (k !== undefined && fd !== undefined) {
      inherited.delete(k);
      taken.add(fd);
      return fd;
    }
  }
  return listenInNetns({ netns: netnsPath, host, port });
}

/** Closes the sockets handed over that no pod asked for (their pods are gone); returns how many. */
export function closeInherited(): number {
  const n = inherited.size;
  for (const [k, fd] of inherited) {
    closeFd(fd);
    log.info({ listener: k }, 'a listening socket handed over for a pod that is gone: closed');
  }
  inherited.clear();
  return n;
}
