// SPDX-License-Identifier: Apache-2.0
// Shared pieces of the addon: system errors that carry code/errno/syscall/path to JS, and a
// Promise-returning worker so nothing that can block runs on the event loop.
#pragma once

#include <napi.h>
#include <unistd.h>
#include <uv.h>

#include <functional>
#include <string>

namespace nodemesh {

// HTTP's bytes are Latin-1 (obs-text included): one byte per char both ways, never UTF-8.
inline std::string Latin1(const Napi::Value& v) {
  size_t n = 0;
  napi_get_value_string_latin1(v.Env(), v, nullptr, 0, &n);
  std::string s(n, '\0');
  napi_get_value_string_latin1(v.Env(), v, s.data(), n + 1, &n);
  return s;
}

inline Napi::String NewLatin1(Napi::Env env, const std::string& s) {
  napi_value out;
  napi_create_string_latin1(env, s.data(), s.size(), &out);
  return Napi::String(env, out);
}

// Closes a libuv handle made with `new` (closing stops it; it is freed once libuv lets go of it).
template <typename Handle>
inline void CloseHandle(Handle*& h) {
  if (!h) return;
  uv_close(reinterpret_cast<uv_handle_t*>(h), [](uv_handle_t* x) { delete reinterpret_cast<Handle*>(x); });
  h = nullptr;
}

// Stops polling a socket on the JS thread's loop and closes it; an fd of -1 is not closed (it was
// handed back to JS).
inline void ClosePolled(uv_poll_t*& poll, int& fd) {
  CloseHandle(poll);
  if (fd >= 0) close(fd);
  fd = -1;
}

// A failed system or libbpf call. `detail` carries libbpf's log (verifier output) if any.
struct SysError {
  int err = 0;
  std::string syscall;
  std::string path;
  std::string detail;
};

[[noreturn]] void ThrowSys(int err, const std::string& syscall, const std::string& path = "");
Napi::Error ToJsError(Napi::Env env, const SysError& e);

// libbpf reports details through a print callback; we keep the last lines per thread so the
// error of a failed load can say why the verifier refused.
void InstallLibbpfLogger();
std::string TakeLibbpfLog();
void ClearLibbpfLog();

// Runs `work` on the libuv pool, then `done` on the JS thread; SysError rejects the Promise.
class PromiseTask : public Napi::AsyncWorker {
 public:
  using Work = std::function<void()>;
  using Done = std::function<Napi::Value(Napi::Env)>;
  static Napi::Promise Run(Napi::Env env, Work work, Done done);

 protected:
  void Execute() override;
  void OnOK() override;
  void OnError(const Napi::Error& e) override;

 private:
  PromiseTask(Napi::Env env, Work work, Done done);
  Napi::Promise::Deferred deferred_;
  Work work_;
  Done done_;
  bool failed_ = false;
  SysError error_;
};

// Per-module state: constructors of the wrapped classes.
struct AddonData {
  Napi::FunctionReference bpfObject;
  Napi::FunctionReference bpfLink;
};

Napi::Object InitBpf(Napi::Env env, Napi::Object exports, AddonData* data);
Napi::Object InitSockets(Napi::Env env, Napi::Object exports);
Napi::Object InitMaps(Napi::Env env, Napi::Object exports);
Napi::Object InitRelay(Napi::Env env, Napi::Object exports);
Napi::Object InitHbone(Napi::Env env, Napi::Object exports);
Napi::Object InitFdPassing(Napi::Env env, Napi::Object exports);
Napi::Object InitHttp1(Napi::Env env, Napi::Object exports);
Napi::Object InitH2(Napi::Env env, Napi::Object exports);

}  // namespace nodemesh
