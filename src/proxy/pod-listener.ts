/** A listening socket made inside a pod's netns, served by node:net in this process. */
import { createServer, type Server, type Socket } from 'node:net';

import { closeFd, listenInNetns, netnsCookie } from '../datapath/native.js';

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
  const fd = await listenInNetns({ netns: netnsPath, host, port });
  let cookie: bigint;
  try {
    cookie = netnsCookie(fd);
  } catch (e) {
    closeFd(fd);
    throw e;
  }
  const server = createServer({ allowHalfOpen: true, highWaterMark: HIGH_WATER_MARK, pauseOnConnect: true }, (s) => onConnection(s, cookie));
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ fd }, () => resolve());
  });
  return { server, fd, netnsCookie: cookie };
}

/** The fd of a TCP socket node:net accepted (libuv exposes it on Unix), if there is one. */
export function socketFd(socket: Socket): number | undefined {
  const fd = (socket as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : undefined;
}
