/** What the test apps (http-app.ts, h2-app.ts) share: a request body read whole, as a hash and a size. */
import { createHash } from 'node:crypto';
import type { Readable } from 'node:stream';

/** Reads `req` to its end, then calls `then` with the body's sha256 (hex) and its length. */
export function readBody(req: Readable, then: (sha256: string, bytes: number) => void): void {
  const hash = createHash('sha256');
  let bytes = 0;
  req.on('data', (chunk: Buffer) => {
    hash.update(chunk);
    bytes += chunk.length;
  });
  req.on('end', () => then(hash.digest('hex'), bytes));
}
