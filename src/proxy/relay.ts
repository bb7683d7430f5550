/**
 * Copies bytes both ways between two sockets: backpressure through pipe(), half-close forwarded
 * (a FIN from one side ends the other's writable side), an idle timeout, and one result when both
 * sides are closed. Sockets close themselves once both directions have ended (autoDestroy).
 */
import { constants as http2constants, type Http2Stream } from 'node:http2';
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
      for (const s of [client, upstream]) abort(s);
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

/** One side of a tunnelled relay: a socket, or an HTTP/2 stream of an HBONE tunnel. */
export type RelaySide = Socket | Http2Stream;

/**
 * Ends a side abnormally: a TCP socket with a reset (SO_LINGER 0), a stream with RST_STREAM
 * (CANCEL). A Unix socket (a socket pair's end: a tunnel stream's or a same-node delivery's) has
 * no reset: node throws ERR_INVALID_HANDLE_TYPE for one, which here ended the agent; it is closed,
 * and its peer's relay reads the end of it where a reset cannot be said.
 */
function abort(side: RelaySide): void {
  if (side.destroyed) return;
  if (!('resetAndDestroy' in side)) return void side.close(http2constants.NGHTTP2_CANCEL);
  try {
    side.resetAndDestroy();
  } catch {
    side.destroy();
  }
}

/**
 * relay() for a connection that has an HTTP/2 stream on one side (an HBONE tunnel): the same
 * half-close, reset and idle rules; bytes are counted on `client` as they pass, since a stream
 * keeps no byte counts. A RST_STREAM from the peer is a reset, and resets the socket side.
 */
export function relayStreams(client: RelaySide, upstream: RelaySide, idleTimeoutMs: number): Promise<RelayResult> {
  return new Promise((resolve) => {
    let error: string | undefined;
    let reason: RelayEndReason | undefined;
    let fromClient = 0;
    let toClient = 0;
    let open = 2;
    // One timer for the relay's life, re-armed by each chunk (refresh() reuses it: no timer object
    // per chunk on a path where every byte passes through JS).
    const idleTimer = setTimeout(() => {
      error ??= `idle for ${idleTimeoutMs} ms`;
      reason ??= 'idle_timeout';
      client.destroy();
      upstream.destroy();
    }, idleTimeoutMs);
    idleTimer.unref();
    const touch = (): void => void idleTimer.refresh();
    const onClose = (): void => {
      // A stream reset by the peer closes without an error event: that is a reset, not an end.
      for (const s of [client, upstream]) {
        if (!('rstCode' in s) || s.rstCode === undefined || s.rstCode === http2constants.NGHTTP2_NO_ERROR || error !== undefined) continue;
        error = `stream reset (code ${s.rstCode})`;
        reason = 'reset';
        for (const other of [client, upstream]) if (other !== s) abort(other);
      }
      if (--open > 0) {
        // One side is closed both ways: it takes nothing more. The other gets what was already
        // relayed to it (its writes are flushed, with a FIN), then goes; a peer still sending on
        // it is reset, since its bytes have nowhere to go. (Otherwise it would wait for the idle
        // timeout, holding its socket and the bytes queued in it.)
        const other = [client, upstream].find((s) => !s.destroyed && !s.closed);
        if (other) {
          if (other.writableFinished) other.destroy();
          else other.end(() => other.destroy());
        }
        return;
      }
      clearTimeout(idleTimer);
      resolve({ bytesFromClient: fromClient, bytesToClient: toClient, ...(error ? { error } : {}), ...(reason ? { reason } : {}) });
    };
    const fail = (e: Error & { code?: string }): void => {
      if (error === undefined) {
        error = e.message;
        reason = e.code === 'ECONNRESET' || e.code === 'ERR_HTTP2_STREAM_ERROR' ? 'reset' : 'error';
      }
      abort(client);
      abort(upstream);
    };
    client.on('data', (d: Buffer) => {
      fromClient += d.length;
      touch();
    });
    upstream.on('data', (d: Buffer) => {
      toClient += d.length;
      touch();
    });
    client.on('error', fail).once('close', onClose);
    upstream.on('error', fail).once('close', onClose);
    // Bytes relayed in JS are written as they come (a request's last segment must not wait for an ACK).
    for (const side of [client, upstream]) if ('setNoDelay' in side) side.setNoDelay(true);
    client.pipe(upstream);
    upstream.pipe(client);
    client.resume();
    upstream.resume();
  });
}
