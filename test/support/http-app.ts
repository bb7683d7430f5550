/**
 * A real HTTP/1.1 server for L7 tests, run as a pod's command: `node http-app.js <name> <port> [broken]`
 * (broken: every answer is a 500).
 *   any path          200, JSON {pod, method, url, headers, remote: the caller's address}
 *   /status/<code>    that status
 *   /echo             the request body back, chunked, with trailers x-body-bytes and x-body-sha256
 *   /big/<n>          n bytes (content-length)
 * and anywhere in the path:
 *   /fail-first/<key>         503 the first time this key is seen, then 200 (with x-body-sha256 and x-body-bytes of the body it read)
 *   /slow/<ms>                200 after ms
 *   /slow-first/<key>/<ms>    200 after ms the first time this key is seen, then at once
 * Every answer carries `x-served-by: <name>`. An upgrade to "echo" is answered 101, then every
 * byte is sent back; any other upgrade is refused with 426.
 */
import { createHash } from 'node:crypto';
import { createServer } from 'node:http';

import { readBody } from './app-body.js';

const [name = 'app', portText = '8080', mode = ''] = process.argv.slice(2);

const seen = new Set<string>();
/** True the first time `key` comes. */
const first = (key: string): boolean => !seen.has(key) && Boolean(seen.add(key));

const server = createServer((req, res) => {
  res.setHeader('x-served-by', name);
  const url = req.url ?? '/';
  if (mode === 'broken') {
    req.resume();
    res.writeHead(500, { 'content-type': 'text/plain' });
    res.end('broken\n');
    return;
  }
  const failFirst = /\/fail-first\/([^/?]+)/.exec(url);
  const slow = /\/slow\/(\d+)/.exec(url);
  const slowFirst = /\/slow-first\/([^/?]+)\/(\d+)/.exec(url);
  if (failFirst || slow || slowFirst) {
    // Answered once the body was read: the 200 says what came (x-body-sha256, x-body-bytes).
    readBody(req, (sha256, bytes) => {
      if (failFirst && first(`fail:${failFirst[1] ?? ''}`)) {
        res.writeHead(503, { 'content-type': 'text/plain' });
        res.end('failing the first time\n');
        return;
      }
      const delay = slow ? Number(slow[1]) : slowFirst && first(`slow:${slowFirst[1] ?? ''}`) ? Number(slowFirst[2]) : 0;
      const received = { 'x-body-sha256': sha256, 'x-body-bytes': String(bytes) };
      setTimeout(() => {
        if (res.destroyed) return;
        res.writeHead(200, { 'content-type': 'text/plain', ...received });
        res.end(`ok after ${delay} ms\n`);
      }, delay);
    });
    return;
  }
  const status = /^\/status\/(\d{3})/.exec(url);
  if (url.startsWith('/echo')) {
    const hash = createHash('sha256');
    let bytes = 0;
    res.writeHead(200, { 'content-type': 'application/octet-stream', trailer: 'x-body-bytes, x-body-sha256' });
    req.on('data', (chunk: Buffer) => {
      hash.update(chunk);
      bytes += chunk.length;
      res.write(chunk);
    });
    req.on('end', () => {
      res.addTrailers({ 'x-body-bytes': String(bytes), 'x-body-sha256': hash.digest('hex') });
      res.end();
    });
    return;
  }
  req.resume();
  if (status) {
    res.writeHead(Number(status[1]), { 'content-type': 'text/plain' });
    res.end(`status ${status[1]}\n`);
    return;
  }
  const big = /^\/big\/(\d+)/.exec(url);
  if (big) {
    const body = Buffer.alloc(Number(big[1]), 0x61);
    res.writeHead(200, { 'content-type': 'text/plain', 'content-length': body.length });
    res.end(body);
    return;
  }
  const body = JSON.stringify({ pod: name, method: req.method, url, headers: req.headers, remote: (req.socket.remoteAddress ?? '').replace(/^::ffff:/, '') });
  res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
  res.end(body);
});
server.on('upgrade', (req, socket, head) => {
  if (req.headers.upgrade !== 'echo') {
    socket.end('HTTP/1.1 426 Upgrade Required\r\ncontent-length: 0\r\nconnection: close\r\n\r\n');
    return;
  }
  socket.write(`HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\nx-served-by: ${name}\r\n\r\n`);
  if (head.length > 0) socket.write(head);
  socket.pipe(socket);
});
server.keepAliveTimeout = 5000;
server.listen(Number(portText), '::', () => process.stdout.write(`listening ${portText}\n`));
process.on('SIGTERM', () => server.close(() => process.exit(0)));
