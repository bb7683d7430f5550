/**
 * TCP ports: a free one for tests and benchmarks, and what a failed listen() means for the
 * operator (the port is taken, or the address is not this machine's) as a NodemeshError naming
 * the address and the option it came from.
 */
import { createServer } from 'node:net';

import { NodemeshError, isSystemError } from './errors.js';

/** Ports freePort handed out in this process: the kernel may offer a just-closed one again. */
const handedOut = new Set<number>();

/**
 * A TCP port on 127.0.0.1 that nothing listens on right now (tests and benchmarks pick ports with
 * it), and not one this process was given before: callers pick several before binding any.
 */
export async function freePort(): Promise<number> {
  for (;;) {
    const port = await new Promise<number>((resolve, reject) => {
      const s = createServer();
      s.once('error', reject);
      s.listen(0, '127.0.0.1', () => {
        const p = (s.address() as { port: number }).port;
        s.close(() => resolve(p));
      });
    });
    if (handedOut.has(port)) continue;
    handedOut.add(port);
    return port;
  }
}

export interface ListenAddress {
  readonly host: string;
  readonly port: number;
}

export function formatAddress(at: ListenAddress): string {
  return `${at.host.includes(':') ? `[${at.host}]` : at.host}:${at.port}`;
}

/**
 * The error for a listen() that failed on `at`; `field` is the option that gave the address
 * (metrics, listen...), named in the message and the fix. Errors that are not the system's own
 * (already a NodemeshError) pass through.
 */
export function listenError(e: unknown, at: ListenAddress, field?: string): Error {
  if (!isSystemError(e)) return e instanceof Error ? e : new Error(String(e));
  const address = formatAddress(at);
  const option = field === undefined ? 'the option' : `--${field}`;
  const where = field === undefined ? address : `${address} (--${field})`;
  const context = { ...(field === undefined ? {} : { field }), address, syscall: e.syscall ?? 'listen', errnoCode: e.code ?? '' };
  if (e.code === 'EADDRINUSE') {
    return new NodemeshError('NM_ERR_PORT_IN_USE', `cannot listen on ${where}: another process listens on port ${at.port}`, {
      context,
      cause: e,
      hint: `stop that process (\`ss -ltnp 'sport = :${at.port}'\` names it), or give ${option} another port`,
    });
  }
  // EADDRNOTAVAIL (not an address of this machine), ENOTFOUND (a host name that does not
  // resolve), EACCES (a port below 1024 without CAP_NET_BIND_SERVICE): the option is wrong.
  return new NodemeshError('NM_ERR_INVALID_ARGUMENT', `cannot listen on ${where}: ${e.code === 'EADDRNOTAVAIL' ? 'the address is not one of this machine\'s' : e.message}`, {
    context,
    cause: e,
    hint: `give ${option} an address of this machine, e.g. 127.0.0.1:${at.port} or 0.0.0.0:${at.port}`,
  });
}

/**
 * Fails as listenError says when nothing could listen on `at` now. For servers whose own bind
 * error loses the errno (gRPC's is a sentence, and it prints it on stderr by itself): checked
 * just before they bind.
 */
export async function checkListen(at: ListenAddress, field?: string): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const s = createServer();
    s.once('error', (e) => reject(listenError(e, at, field)));
    s.listen(at.port, at.host, () => s.close(() => resolve()));
  });
}
