/** The test gRPC service (mesh.test.Echo) with raw-byte messages: no .proto, no codegen. */
const raw = { requestSerialize: (b: Buffer): Buffer => b, requestDeserialize: (b: Buffer): Buffer => b, responseSerialize: (b: Buffer): Buffer => b, responseDeserialize: (b: Buffer): Buffer => b };
const method = (name: string, requestStream: boolean, responseStream: boolean) => ({ path: `/mesh.test.Echo/${name}`, requestStream, responseStream, originalName: name, ...raw });

export const ECHO_SERVICE = {
  Unary: method('Unary', false, false),
  ServerStream: method('ServerStream', false, true),
  ClientStream: method('ClientStream', true, false),
  Bidi: method('Bidi', true, true),
  Fail: method('Fail', false, false),
};
