/**
 * Copies bytes both ways between two sockets: backpressure through pipe(), half-close forwarded
 * (a FIN from one side ends the other's writable side), an idle timeout, and one result when both
 * sides are closed. Sockets close themselves once both directions have ended (autoDestroy).
 */
import type { Socket } from 'node:net';

import type { RelayEndReason } from '../datapath/native.js';

export interface RelayResult {
  /** Bytes read from the downstream (client) side. */
  readonly bytesFromClient: number;
  /** Bytes written to the downstream (client) side. */
  readonly bytesToClient: number;
  readonly error?: string;
  readonly reason?: RelayEndReason;
}

/**
 * A side that fails (a reset, an error) resets the other too, as the kernel relay does: a client
 * whose upstream died mid-response must not see a clean end of stream (a truncated response that
 * looks complete). The idle timeout closes both with a FIN.
 */
export function relay(client: Socket, upstream: Socket, idleTimeoutMs: number): Promise<RelayResult> {
  return new Promise((resolve) => {
    let error: string | undefined;
    let reason: RelayEndReason | undefined;
    let open = 2;
    const onClose = (): void => {
      if (--open > 0) return;
      resolve({ bytesFromClient: client.bytesRead, bytesToClient: client.bytesWritten, ...(error ? { error } : {}), ...(reason ? { reason } : {}) });
    };
    const fail = (e: Error & { code?: string }): void => {
      if (error === undefined) {
        error = e.message;
        reason = e.code === 'ECONNRESET' ? 'reset' : 'error';
      }
      for (const s of [client, upstream]) if (!s.destroyed) s.resetAndDestroy();
    };
    const idle = (): void => {
      error ??= `idle for ${idleTimeoutMs} ms`;
      reason ??= 'idle_timeout';
      client.destroy();
      upstream.destroy();
    };
    client.setTimeout(idleTimeoutMs, idle);
    client.on('error', fail).once('close', onClose);
    upstream.on('error', fail).once('close', onClose);
    client.pipe(upstream);
    upstream.pipe(client);
    client.resume();
  });
}
