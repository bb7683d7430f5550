/**
 * Copies bytes both ways between two sockets: backpressure through pipe(), half-close forwarded
 * (a FIN from one side ends the other's writable side), an idle timeout, and one result when both
 * sides are closed. Sockets close themselves once both directions have ended (autoDestroy).
 */
import type { Socket } from 'node:net';

export interface RelayResult {
  /** Bytes read from the downstream (client) side. */
  readonly bytesFromClient: number;
  /** Bytes written to the downstream (client) side. */
  readonly bytesToClient: number;
  readonly error?: string;
}

export function relay(client: Socket, upstream: Socket, idleTimeoutMs: number): Promise<RelayResult> {
  return new Promise((resolve) => {
    let error: string | undefined;
    let open = 2;
    const onClose = (): void => {
      if (--open > 0) return;
      resolve({ bytesFromClient: client.bytesRead, bytesToClient: client.bytesWritten, ...(error ? { error } : {}) });
    };
    const fail = (e: Error): void => {
      error ??= e.message;
      client.destroy();
      upstream.destroy();
    };
    const idle = (): void => fail(new Error(`idle for ${idleTimeoutMs} ms`));
    client.setTimeout(idleTimeoutMs, idle);
    client.on('error', fail).once('close', onClose);
    upstream.on('error', fail).once('close', onClose);
    client.pipe(upstream);
    upstream.pipe(client);
    client.resume();
  });
}
