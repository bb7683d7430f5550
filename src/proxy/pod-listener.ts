/** A listening socket made inside a pod's netns, served by node:net in this process. */
import { createServer, type Server, type Socket } from 'node:net';

import { closeFd, netnsCookie } from '../datapath/native.js';
import { acceptWhenOurs, listenInPodNetns } from './listen-sockets.js';

/** Large socket buffers: fewer, bigger reads and writes per relayed byte. */
export const HIGH_WATER_MARK = 1 << 20;

export interface PodListener {
  readonly server: Server;
  /** The listening fd (for the sk_lookup SOCKHASH). */
  readonly fd: number;
  /** SO_NETNS_COOKIE of the pod's netns, the key the capture maps use. */
  readonly netnsCookie: bigint;
}

/**
 * Listens on host:port inside the pod; each accepted connection arrives paused (the caller
 * decides where it goes before any byte is read) with the pod's netns cookie.
 */
export async function listenInPod(netnsPath: string, host: string, port: number, onConnection: (socket: Socket, netnsCookie: bigint) => void): Promise<PodListener> {
  const fd = await listenInPodNetns(netnsPath, host, port);
  let cookie: bigint;
  try {
    cookie = netnsCookie(fd);
  } catch (e) {
    closeFd(fd);
    throw e;
  }
  const server = createServer({ allowHalfOpen: true, highWaterMark: HIGH_WATER_MARK, pauseOnConnect: true }, (s) => onConnection(s, cookie));
  await serveOnFd(server, fd);
  return { server, fd, netnsCookie: cookie };
}

/**
 * Starts `server` accepting on a listening fd: now (resolves once it listens), or, for a socket
 * handed over by the agent before this one, at the handover's commit (resolves at once). listen()
 * on a socket that is already listening only starts accepting.
 */
export async function serveOnFd(server: Server, fd: number): Promise<void> {
  if (acceptWhenOurs(fd, listenOnce(server, fd)) === 'at-commit') return;
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.once('listening', () => {
      server.off('error', reject);
      resolve();
    });
  });
}

/**
 * Starts `server` on fd, unless it was closed first (a pod that went before a handover's commit):
 * then the fd, which the server never owned, is closed.
 */
function listenOnce(server: Server, fd: number): () => void {
  let closed = false;
  server.once('close', () => (closed = true));
  return () => {
    if (closed) closeFd(fd);
    else server.listen({ fd });
  };
}

/** The fd of a TCP socket node:net accepted (libuv exposes it on Unix), if there is one. */
export function socketFd(socket: Socket): number | undefined {
  const fd = (socket as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : undefined;
}
