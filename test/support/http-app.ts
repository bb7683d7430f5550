/**
 * A real HTTP/1.1 server for L7 tests, run as a pod's command: `node http-app.js <name> <port>`.
 *   any path          200, JSON {pod, method, url, headers}
 *   /status/<code>    that status
 *   /echo             the request body back, chunked, with trailers x-body-bytes and x-body-sha256
 *   /big/<n>          n bytes (content-length)
 * Every answer carries `x-served-by: <name>`.
 */
import { createHash } from 'node:crypto';
import { createServer } from 'node:http';

const [name = 'app', portText = '8080'] = process.argv.slice(2);

const server = createServer((req, res) => {
  res.setHeader('x-served-by', name);
  const url = req.url ?? '/';
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
  const body = JSON.stringify({ pod: name, method: req.method, url, headers: req.headers });
  res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
  res.end(body);
});
server.keepAliveTimeout = 5000;
server.listen(Number(portText), '::', () => process.stdout.write(`listening ${portText}\n`));
process.on('SIGTERM', () => server.close(() => process.exit(0)));
