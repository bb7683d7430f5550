// SPDX-License-Identifier: Apache-2.0
// Module entry. Only src/datapath/native.ts loads this file.
#include <sys/resource.h>
#include <v8.h>

#include <cerrno>
#include <cstddef>

#include "channel.h"
#include "common.h"
#include "nodemesh_abi.h"

namespace nodemesh {
namespace {

#define NM_FIELD(obj, type, field) obj.Set(#field, Napi::Number::New(env, offsetof(type, field)))

Napi::Object Layout(Napi::Env env, size_t size, Napi::Object offsets) {
  Napi::Object out = Napi::Object::New(env);
  out.Set("size", Napi::Number::New(env, size));
  out.Set("offsets", offsets);
  return out;
}

// abiLayout(): sizes and offsets of the shared ABI structs as this C++ compiler sees them.
Napi::Value AbiLayout(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object out = Napi::Object::New(env);

  Napi::Object addr = Napi::Object::New(env);
  NM_FIELD(addr, nm_addr, family);
  NM_FIELD(addr, nm_addr, port);
  NM_FIELD(addr, nm_addr, pad);
  NM_FIELD(addr, nm_addr, addr);
  out.Set("nm_addr", Layout(env, sizeof(nm_addr), addr));

  Napi::Object key = Napi::Object::New(env);
  NM_FIELD(key, nm_orig_key, netns_cookie);
  NM_FIELD(key, nm_orig_key, port);
  NM_FIELD(key, nm_orig_key, family);
  NM_FIELD(key, nm_orig_key, pad);
  out.Set("nm_orig_key", Layout(env, sizeof(nm_orig_key), key));

  Napi::Object lk = Napi::Object::New(env);
  NM_FIELD(lk, nm_listener_key, family);
  NM_FIELD(lk, nm_listener_key, role);
  NM_FIELD(lk, nm_listener_key, addr);
  out.Set("nm_listener_key", Layout(env, sizeof(nm_listener_key), lk));

  Napi::Object bk = Napi::Object::New(env);
  NM_FIELD(bk, nm_bypass_key, family);
  NM_FIELD(bk, nm_bypass_key, remote_port);
  NM_FIELD(bk, nm_bypass_key, local_port);
  NM_FIELD(bk, nm_bypass_key, remote_addr);
  NM_FIELD(bk, nm_bypass_key, local_addr);
  out.Set("nm_bypass_key", Layout(env, sizeof(nm_bypass_key), bk));

  Napi::Object constants = Napi::Object::New(env);
  constants.Set("NM_MAP_ABI_VERSION", NM_MAP_ABI_VERSION);
  constants.Set("NM_PROXY_MARK", NM_PROXY_MARK);
  constants.Set("NM_DELIVERY_MARK", NM_DELIVERY_MARK);
  constants.Set("NM_DELIVERY_TABLE", NM_DELIVERY_TABLE);
  constants.Set("NM_PORT_OUTBOUND", NM_PORT_OUTBOUND);
  constants.Set("NM_PORT_INBOUND", NM_PORT_INBOUND);
  constants.Set("NM_PORT_INBOUND_TUNNEL", NM_PORT_INBOUND_TUNNEL);
  constants.Set("NM_PORT_DNS", NM_PORT_DNS);
  constants.Set("NM_ROLE_INBOUND", NM_ROLE_INBOUND);
  constants.Set("NM_ROLE_INBOUND_TUNNEL", NM_ROLE_INBOUND_TUNNEL);
  out.Set("constants", constants);
  return out;
}

// raiseFdLimit(): {soft, hard}: RLIMIT_NOFILE's soft limit raised to the hard one. Every proxied
// connection holds several fds; the default soft limit (1024) is a node-wide cap nobody chose.
Napi::Value RaiseFdLimit(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  struct rlimit rl = {};
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0) throw ToJsError(env, {errno, "getrlimit", "RLIMIT_NOFILE", ""});
  if (rl.rlim_cur < rl.rlim_max) {
    struct rlimit raised = {rl.rlim_max, rl.rlim_max};
    if (setrlimit(RLIMIT_NOFILE, &raised) == 0) rl = raised;
  }
  Napi::Object out = Napi::Object::New(env);
  out.Set("soft", Napi::Number::New(env, static_cast<double>(rl.rlim_cur)));
  out.Set("hard", Napi::Number::New(env, static_cast<double>(rl.rlim_max)));
  return out;
}

// trimHeap(): V8's full, compacting, memory-reducing collection (what its memory reducer does),
// now. The agent runs without the memory reducer and calls this when its loop has been idle
// (src/shared/heap-trim.ts): the pause it costs (10-20 ms) then delays no request.
Napi::Value TrimHeap(const Napi::CallbackInfo& info) {
  v8::Isolate* isolate = v8::Isolate::GetCurrent();
  if (isolate != nullptr) isolate->LowMemoryNotification();
  return info.Env().Undefined();
}

Napi::Object InitAll(Napi::Env env, Napi::Object exports) {
  auto* data = new AddonData();
  env.SetInstanceData<AddonData>(data);
  InitBpf(env, exports, data);
  InitMaps(env, exports);
  InitSockets(env, exports);
  InitRelay(env, exports);
  InitHbone(env, exports);
  InitFdPassing(env, exports);
  InitHttp1(env, exports);
  InitH2(env, exports);
  InitChannel(env, exports);
  exports.Set("abiLayout", Napi::Function::New(env, AbiLayout, "abiLayout"));
  exports.Set("raiseFdLimit", Napi::Function::New(env, RaiseFdLimit, "raiseFdLimit"));
  exports.Set("trimHeap", Napi::Function::New(env, TrimHeap, "trimHeap"));
  return exports;
}

}  // namespace

Napi::Object Init(Napi::Env env, Napi::Object exports) { return InitAll(env, exports); }

}  // namespace nodemesh

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) { return nodemesh::Init(env, exports); }

NODE_API_MODULE(nodemesh_native, InitModule)
