/**
 * Loopback helpers the engine unit tests share: a server listening on an ephemeral port, a new
 * connection's fd (the caller's, as the node proxy hands engines theirs), and raw HTTP/2 frames.
 */
import { once } from 'node:events';
import { connect, createServer, type Server } from 'node:net';

import { dupFd } from '../../src/datapath/native.js';
import { socketFd } from '../../src/proxy/pod-listener.js';

/** Listens on 127.0.0.1 (an ephemeral port): the port. */
export async function listening(server: Pick<Server, 'listen' | 'address' | 'once'>): Promise<number> {
  server.listen(0, '127.0.0.1');
  await once(server as Server, 'listening');
  return (server.address() as { port: number }).port;
}

/** An fd of a new loopback connection to `port`, the caller's. */
export async function dialFd(port: number): Promise<number> {
  const s = connect(port, '127.0.0.1');
  await once(s, 'connect');
  const fd = dupFd(socketFd(s) ?? -1);
  s.destroy();
  return fd;
}

/**
 * A listener whose every accepted connection is given to an engine (`serve`, with a new id and
 * a duplicate of the fd; the accepted socket is closed, as the engine owns its copy): the server.
 */
export function engineFront(serve: (id: number, fd: number) => void): Server {
  let ids = 0;
  return createServer({ pauseOnConnect: true }, (client) => {
    serve(++ids, dupFd(socketFd(client) ?? -1));
    client.destroy();
  });
}

/** One HTTP/2 frame as it goes on the wire (RFC 9113 4.1). */
export function h2Frame(type: number, flags: number, stream: number, payload = Buffer.alloc(0)): Buffer {
  const head = Buffer.alloc(9);
  head.writeUIntBE(payload.length, 0, 3);
  head[3] = type;
  head[4] = flags;
  head.writeUInt32BE(stream, 5);
  return Buffer.concat([head, payload]);
}

/** Polls `check` every 10 ms until it holds; throws after `ms`. */
export async function until(what: string, check: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}
