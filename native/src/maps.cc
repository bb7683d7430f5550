// SPDX-License-Identifier: Apache-2.0
// Map operations by fd. These syscalls work on in-kernel memory and do not block, so they are
// synchronous, as in Cilium's and libbpf's own tools.
#include <bpf/bpf.h>
#include <errno.h>
#include <unistd.h>

#include <vector>

#include "common.h"

namespace nodemesh {

namespace {

Napi::Buffer<uint8_t> CopyBuffer(Napi::Env env, const std::vector<uint8_t>& bytes) {
  return Napi::Buffer<uint8_t>::Copy(env, bytes.data(), bytes.size());
}

int FdArg(const Napi::CallbackInfo& info, size_t i) { return info[i].As<Napi::Number>().Int32Value(); }

bpf_map_info MapInfo(Napi::Env env, int fd) {
  bpf_map_info mi = {};
  uint32_t len = sizeof(mi);
  if (bpf_obj_get_info_by_fd(fd, &mi, &len) != 0)
    throw ToJsError(env, {errno, "bpf(BPF_OBJ_GET_INFO_BY_FD)", "fd " + std::to_string(fd), ""});
  return mi;
}

void CheckSize(Napi::Env env, const char* what, size_t got, uint32_t want, const bpf_map_info& mi) {
  if (got != want)
    throw Napi::RangeError::New(env, std::string("map ") + mi.name + ": " + what + " is " + std::to_string(got) +
                                         " bytes, the map wants " + std::to_string(want));
}

Napi::Value Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  bpf_map_info mi = MapInfo(env, FdArg(info, 0));
  Napi::Object out = Napi::Object::New(env);
  out.Set("id", mi.id);
  out.Set("name", mi.name);
  out.Set("type", mi.type);
  out.Set("keySize", mi.key_size);
  out.Set("valueSize", mi.value_size);
  out.Set("maxEntries", mi.max_entries);
  return out;
}

// lookup(fd, key): Buffer | null
Napi::Value Lookup(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = FdArg(info, 0);
  auto key = info[1].As<Napi::Buffer<uint8_t>>();
  bpf_map_info mi = MapInfo(env, fd);
  CheckSize(env, "key", key.Length(), mi.key_size, mi);
  std::vector<uint8_t> value(mi.value_size);
  if (bpf_map_lookup_elem(fd, key.Data(), value.data()) != 0) {
    if (errno == ENOENT) return env.Null();
    throw ToJsError(env, {errno, "bpf(BPF_MAP_LOOKUP_ELEM)", mi.name, ""});
  }
  return CopyBuffer(env, value);
}

// update(fd, key, value, flags)
Napi::Value Update(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = FdArg(info, 0);
  auto key = info[1].As<Napi::Buffer<uint8_t>>();
  auto value = info[2].As<Napi::Buffer<uint8_t>>();
  uint64_t flags = info.Length() > 3 ? static_cast<uint64_t>(info[3].As<Napi::Number>().Int64Value()) : static_cast<uint64_t>(BPF_ANY);
  bpf_map_info mi = MapInfo(env, fd);
  CheckSize(env, "key", key.Length(), mi.key_size, mi);
  CheckSize(env, "value", value.Length(), mi.value_size, mi);
  if (bpf_map_update_elem(fd, key.Data(), value.Data(), flags) != 0)
    throw ToJsError(env, {errno, "bpf(BPF_MAP_UPDATE_ELEM)", mi.name, ""});
  return env.Undefined();
}

// remove(fd, key): true if an entry was deleted
Napi::Value Delete(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = FdArg(info, 0);
  auto key = info[1].As<Napi::Buffer<uint8_t>>();
  if (bpf_map_delete_elem(fd, key.Data()) != 0) {
    if (errno == ENOENT) return Napi::Boolean::New(env, false);
    throw ToJsError(env, {errno, "bpf(BPF_MAP_DELETE_ELEM)", "fd " + std::to_string(fd), ""});
  }
  return Napi::Boolean::New(env, true);
}

// keys(fd): Buffer[]; a snapshot, entries may change while we walk.
Napi::Value Keys(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = FdArg(info, 0);
  bpf_map_info mi = MapInfo(env, fd);
  Napi::Array out = Napi::Array::New(env);
  std::vector<uint8_t> cur(mi.key_size), next(mi.key_size);
  const void* prev = nullptr;
  uint32_t i = 0;
  while (i < mi.max_entries) {
    if (bpf_map_get_next_key(fd, prev, next.data()) != 0) {
      if (errno == ENOENT) break;
      throw ToJsError(env, {errno, "bpf(BPF_MAP_GET_NEXT_KEY)", mi.name, ""});
    }
    out.Set(i++, CopyBuffer(env, next));
    cur.swap(next);
    prev = cur.data();
  }
  return out;
}

// mapCount(fd): how many entries the map holds, without handing any key to JS. Batched lookups
// (hundreds of entries per syscall) where the map type has them, else one syscall per key.
Napi::Value Count(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = FdArg(info, 0);
  bpf_map_info mi = MapInfo(env, fd);
  constexpr uint32_t kBatch = 512;
  std::vector<uint8_t> keys(static_cast<size_t>(mi.key_size) * kBatch), values(static_cast<size_t>(mi.value_size) * kBatch);
  std::vector<uint8_t> in(mi.key_size < 8 ? 8 : mi.key_size), out(in.size());
  uint64_t total = 0;
  bool first = true;
  bool batched = true;
  for (;;) {
    uint32_t n = kBatch;
    int rc = bpf_map_lookup_batch(fd, first ? nullptr : in.data(), out.data(), keys.data(), values.data(), &n, nullptr);
    if (rc != 0 && errno != ENOENT) {
      // Map types without batch operations (SOCKHASH) say EINVAL or the kernel's ENOTSUPP (524).
      if (first) batched = false;
      else throw ToJsError(env, {errno, "bpf(BPF_MAP_LOOKUP_BATCH)", mi.name, ""});
      break;
    }
    total += n;
    if (rc != 0) break;  // ENOENT: that was the last batch
    in.swap(out);
    first = false;
  }
  if (!batched) {
    std::vector<uint8_t> cur(mi.key_size), next(mi.key_size);
    const void* prev = nullptr;
    while (total < mi.max_entries && bpf_map_get_next_key(fd, prev, next.data()) == 0) {
      total++;
      cur.swap(next);
      prev = cur.data();
    }
  }
  return Napi::Number::New(env, static_cast<double>(total));
}

// openPinned(path): fd of a pinned map or program
Napi::Value OpenPinned(const Napi::CallbackInfo& info) {
  std::string path = info[0].As<Napi::String>();
  int fd = bpf_obj_get(path.c_str());
  if (fd < 0) throw ToJsError(info.Env(), {errno, "bpf(BPF_OBJ_GET)", path, ""});
  return Napi::Number::New(info.Env(), fd);
}

// pin(fd, path): pins a map or program fd at path on bpffs
Napi::Value Pin(const Napi::CallbackInfo& info) {
  int fd = FdArg(info, 0);
  std::string path = info[1].As<Napi::String>();
  if (bpf_obj_pin(fd, path.c_str()) != 0) throw ToJsError(info.Env(), {errno, "bpf(BPF_OBJ_PIN)", path, ""});
  return info.Env().Undefined();
}

Napi::Value CloseFd(const Napi::CallbackInfo& info) {
  int fd = FdArg(info, 0);
  if (close(fd) != 0) throw ToJsError(info.Env(), {errno, "close", "fd " + std::to_string(fd), ""});
  return info.Env().Undefined();
}

}  // namespace

Napi::Object InitMaps(Napi::Env env, Napi::Object exports) {
  exports.Set("mapInfo", Napi::Function::New(env, Info, "mapInfo"));
  exports.Set("mapLookup", Napi::Function::New(env, Lookup, "mapLookup"));
  exports.Set("mapUpdate", Napi::Function::New(env, Update, "mapUpdate"));
  exports.Set("mapDelete", Napi::Function::New(env, Delete, "mapDelete"));
  exports.Set("mapKeys", Napi::Function::New(env, Keys, "mapKeys"));
  exports.Set("mapCount", Napi::Function::New(env, Count, "mapCount"));
  exports.Set("openPinned", Napi::Function::New(env, OpenPinned, "openPinned"));
  exports.Set("pinFd", Napi::Function::New(env, Pin, "pinFd"));
  exports.Set("closeFd", Napi::Function::New(env, CloseFd, "closeFd"));
  return exports;
}

}  // namespace nodemesh
