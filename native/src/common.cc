// SPDX-License-Identifier: Apache-2.0
#include "common.h"

#include <bpf/libbpf.h>
#include <string.h>

#include <cstdarg>
#include <cstdio>

namespace nodemesh {

namespace {
constexpr size_t kMaxLog = 4096;
thread_local std::string tls_libbpf_log;

int LibbpfPrint(enum libbpf_print_level level, const char* fmt, va_list args) {
  if (level == LIBBPF_DEBUG) return 0;
  char line[1024];
  int n = vsnprintf(line, sizeof(line), fmt, args);
  if (n <= 0) return 0;
  tls_libbpf_log.append(line);
  if (tls_libbpf_log.size() > kMaxLog) tls_libbpf_log.erase(0, tls_libbpf_log.size() - kMaxLog);
  return 0;
}
}  // namespace

void InstallLibbpfLogger() { libbpf_set_print(LibbpfPrint); }

std::string TakeLibbpfLog() {
  std::string out;
  out.swap(tls_libbpf_log);
  return out;
}

void ClearLibbpfLog() { tls_libbpf_log.clear(); }

void ThrowSys(int err, const std::string& syscall, const std::string& path) {
  SysError e;
  e.err = err < 0 ? -err : err;
  e.syscall = syscall;
  e.path = path;
  e.detail = TakeLibbpfLog();
  throw e;
}

Napi::Error ToJsError(Napi::Env env, const SysError& e) {
  const char* name = strerrorname_np(e.err);
  std::string message = e.syscall;
  if (!e.path.empty()) message += " " + e.path;
  message += ": ";
  message += strerror(e.err);
  Napi::Error error = Napi::Error::New(env, message);
  error.Set("code", Napi::String::New(env, name ? name : "EUNKNOWN"));
  error.Set("errno", Napi::Number::New(env, e.err));
  error.Set("syscall", Napi::String::New(env, e.syscall));
  if (!e.path.empty()) error.Set("path", Napi::String::New(env, e.path));
  if (!e.detail.empty()) error.Set("detail", Napi::String::New(env, e.detail));
  return error;
}

PromiseTask::PromiseTask(Napi::Env env, Work work, Done done)
    : Napi::AsyncWorker(env, "nodemesh.native"),
      deferred_(Napi::Promise::Deferred::New(env)),
      work_(std::move(work)),
      done_(std::move(done)) {}

Napi::Promise PromiseTask::Run(Napi::Env env, Work work, Done done) {
  auto* task = new PromiseTask(env, std::move(work), std::move(done));
  Napi::Promise promise = task->deferred_.Promise();
  task->Queue();
  return promise;
}

void PromiseTask::Execute() {
  ClearLibbpfLog();
  try {
    work_();
  } catch (const SysError& e) {
    failed_ = true;
    error_ = e;
  }
}

void PromiseTask::OnOK() {
  Napi::Env env = Env();
  if (failed_) {
    deferred_.Reject(ToJsError(env, error_).Value());
    return;
  }
  try {
    deferred_.Resolve(done_(env));
  } catch (const Napi::Error& e) {
    deferred_.Reject(e.Value());
  } catch (const SysError& e) {
    deferred_.Reject(ToJsError(env, e).Value());
  }
}

void PromiseTask::OnError(const Napi::Error& e) { deferred_.Reject(e.Value()); }

}  // namespace nodemesh
