/**
 * A real gRPC server (@grpc/grpc-js, h2c) for L7 tests, run as a pod's command:
 * `node grpc-app.js <name> <port>`. Service mesh.test.Echo, messages as raw bytes:
 *   Unary          {pod, got: bytes, version: the x-version metadata, requestId: the x-request-id} as JSON
 *   ServerStream   the request's first byte says how many messages (each {pod, n})
 *   ClientStream   {pod, messages, bytes} once the client's stream ends
 *   Bidi           every message back as it comes, then {pod, end: true}
 *   Fail           status NOT_FOUND (a trailers-only answer), with the pod in its details
 * Every answer's metadata carries x-served-by: <name>.
 */
import { Metadata, Server, ServerCredentials, status, type ServiceDefinition } from '@grpc/grpc-js';

import { ECHO_SERVICE } from './grpc-service.js';

const [name = 'app', portText = '8080'] = process.argv.slice(2);
const json = (v: unknown): Buffer => Buffer.from(JSON.stringify(v));
const served = (): Metadata => {
  const md = new Metadata();
  md.set('x-served-by', name);
  return md;
};

const server = new Server();
server.addService(ECHO_SERVICE as ServiceDefinition, {
  Unary: (call: { request: Buffer; metadata: Metadata; sendMetadata(md: Metadata): void }, done: (err: null, out: Buffer) => void) => {
    call.sendMetadata(served());
    done(null, json({ pod: name, got: call.request.length, version: call.metadata.get('x-version')[0] ?? '', requestId: call.metadata.get('x-request-id')[0] ?? '' }));
  },
  ServerStream: (call: { request: Buffer; sendMetadata(md: Metadata): void; write(b: Buffer): boolean; end(): void }) => {
    call.sendMetadata(served());
    const n = call.request[0] ?? 0;
    for (let i = 0; i < n; i++) call.write(json({ pod: name, n: i }));
    call.end();
  },
  ClientStream: (call: { sendMetadata(md: Metadata): void; on(e: string, f: (b?: Buffer) => void): void }, done: (err: null, out: Buffer) => void) => {
    call.sendMetadata(served());
    let messages = 0;
    let bytes = 0;
    call.on('data', (b?: Buffer) => {
      messages++;
      bytes += b?.length ?? 0;
    });
    call.on('end', () => done(null, json({ pod: name, messages, bytes })));
  },
  Bidi: (call: { sendMetadata(md: Metadata): void; on(e: string, f: (b?: Buffer) => void): void; write(b: Buffer): boolean; end(): void }) => {
    call.sendMetadata(served());
    call.on('data', (b?: Buffer) => call.write(b ?? Buffer.alloc(0)));
    call.on('end', () => {
      call.write(json({ pod: name, end: true }));
      call.end();
    });
  },
  Fail: (_call: unknown, done: (err: { code: number; details: string }) => void) => done({ code: status.NOT_FOUND, details: `no such thing at ${name}` }),
});
server.bindAsync(`0.0.0.0:${portText}`, ServerCredentials.createInsecure(), (err) => {
  if (err) throw err;
});
process.on('SIGTERM', () => server.forceShutdown());
