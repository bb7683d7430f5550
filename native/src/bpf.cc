// SPDX-License-Identifier: Apache-2.0
// BPF objects and links over libbpf. Loading and attaching run on the libuv pool; the JS side
// sees BpfObject and BpfLink through src/datapath/native.ts only.
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <map>
#include <string>

#include "common.h"

namespace nodemesh {

namespace {

int LibbpfErr(const void* ptr) {
  // libbpf 1.x returns NULL and sets errno.
  (void)ptr;
  return errno ? errno : EINVAL;
}

class BpfObject;

class BpfLink : public Napi::ObjectWrap<BpfLink> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "BpfLink",
                       {
                           InstanceMethod("fd", &BpfLink::Fd),
                           InstanceMethod("pin", &BpfLink::Pin),
                           InstanceMethod("unpin", &BpfLink::Unpin),
                           InstanceMethod("detach", &BpfLink::Detach),
                           InstanceMethod("close", &BpfLink::Close),
                           InstanceMethod("updateProgram", &BpfLink::UpdateProgram),
                       });
  }

  static Napi::Object Wrap(Napi::Env env, bpf_link* link) {
    auto* data = env.GetInstanceData<AddonData>();
    return data->bpfLink.New({Napi::External<bpf_link>::New(env, link)});
  }

  explicit BpfLink(const Napi::CallbackInfo& info) : Napi::ObjectWrap<BpfLink>(info) {
    link_ = info[0].As<Napi::External<bpf_link>>().Data();
  }

  // Closing the fd of an unpinned link detaches it; a pinned link stays attached.
  ~BpfLink() override { Release(); }

 private:
  void Release() {
    if (link_) {
      bpf_link__destroy(link_);
      link_ = nullptr;
    }
  }

  bpf_link* Live(Napi::Env env) {
    if (!link_) throw Napi::Error::New(env, "BPF link is closed");
    return link_;
  }

  Napi::Value Fd(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), bpf_link__fd(Live(info.Env())));
  }

  Napi::Value Pin(const Napi::CallbackInfo& info) {
    std::string path = info[0].As<Napi::String>();
    int err = bpf_link__pin(Live(info.Env()), path.c_str());
    if (err) throw ToJsError(info.Env(), {-err, "bpf_link__pin", path, TakeLibbpfLog()});
    return info.Env().Undefined();
  }

  Napi::Value Unpin(const Napi::CallbackInfo& info) {
    bpf_link* link = Live(info.Env());
    const char* path = bpf_link__pin_path(link);
    std::string p = path ? path : "";
    int err = bpf_link__unpin(link);
    if (err && err != -EINVAL) throw ToJsError(info.Env(), {-err, "bpf_link__unpin", p, ""});
    return info.Env().Undefined();
  }

  // Forces the program off its hook even if the link is pinned or held elsewhere.
  Napi::Value Detach(const Napi::CallbackInfo& info) {
    int err = bpf_link__detach(Live(info.Env()));
    if (err) throw ToJsError(info.Env(), {-err, "bpf_link__detach", "", ""});
    return info.Env().Undefined();
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    Release();
    return info.Env().Undefined();
  }

  Napi::Value UpdateProgram(const Napi::CallbackInfo& info);

  bpf_link* link_ = nullptr;
};

class BpfObject : public Napi::ObjectWrap<BpfObject> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "BpfObject",
                       {
                           InstanceMethod("programs", &BpfObject::Programs),
                           InstanceMethod("maps", &BpfObject::Maps),
                           InstanceMethod("attachCgroup", &BpfObject::AttachCgroup),
                           InstanceMethod("attachNetns", &BpfObject::AttachNetns),
                           InstanceMethod("close", &BpfObject::Close),
                       });
  }

  explicit BpfObject(const Napi::CallbackInfo& info) : Napi::ObjectWrap<BpfObject>(info) {
    obj_ = info[0].As<Napi::External<bpf_object>>().Data();
    path_ = info[1].As<Napi::String>();
  }

  ~BpfObject() override {
    if (obj_ && pending_ == 0) bpf_object__close(obj_);
  }

  bpf_program* Program(Napi::Env env, const std::string& name) {
    if (!obj_) throw Napi::Error::New(env, "BPF object " + path_ + " is closed");
    bpf_program* prog = bpf_object__find_program_by_name(obj_, name.c_str());
    if (!prog) throw ToJsError(env, {ENOENT, "bpf_object__find_program_by_name", path_ + ":" + name, ""});
    return prog;
  }

  // open + load, off the event loop.
  static Napi::Value Load(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    std::string path = info[0].As<Napi::String>();
    std::string pinDir;
    std::map<std::string, uint32_t> constants;
    if (info.Length() > 1 && info[1].IsObject()) {
      Napi::Object opts = info[1].As<Napi::Object>();
      if (opts.Has("mapPinDir") && opts.Get("mapPinDir").IsString())
        pinDir = opts.Get("mapPinDir").As<Napi::String>();
    }
    auto result = std::make_shared<bpf_object*>(nullptr);
    return PromiseTask::Run(
        env,
        [path, pinDir, result]() {
          bpf_object* obj = bpf_object__open_file(path.c_str(), nullptr);
          if (!obj) ThrowSys(LibbpfErr(obj), "bpf_object__open_file", path);
          if (!pinDir.empty()) {
            bpf_map* map;
            bpf_object__for_each_map(map, obj) {
              if (bpf_map__is_internal(map)) continue;
              std::string pin = pinDir + "/" + bpf_map__name(map);
              int err = bpf_map__set_pin_path(map, pin.c_str());
              if (err) {
                bpf_object__close(obj);
                ThrowSys(err, "bpf_map__set_pin_path", pin);
              }
            }
          }
          int err = bpf_object__load(obj);
          if (err) {
            SysError e{-err, "bpf_object__load", path, TakeLibbpfLog()};
            bpf_object__close(obj);
            throw e;
          }
          *result = obj;
        },
        [path, result](Napi::Env env) -> Napi::Value {
          auto* data = env.GetInstanceData<AddonData>();
          return data->bpfObject.New({Napi::External<bpf_object>::New(env, *result), Napi::String::New(env, path)});
        });
  }

 private:
  Napi::Value Programs(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Array out = Napi::Array::New(env);
    if (!obj_) return out;
    bpf_program* prog;
    uint32_t i = 0;
    bpf_object__for_each_program(prog, obj_) {
      Napi::Object p = Napi::Object::New(env);
      p.Set("name", bpf_program__name(prog));
      p.Set("section", bpf_program__section_name(prog));
      p.Set("fd", bpf_program__fd(prog));
      out.Set(i++, p);
    }
    return out;
  }

  Napi::Value Maps(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Array out = Napi::Array::New(env);
    if (!obj_) return out;
    bpf_map* map;
    uint32_t i = 0;
    bpf_object__for_each_map(map, obj_) {
      if (bpf_map__is_internal(map)) continue;
      Napi::Object m = Napi::Object::New(env);
      m.Set("name", bpf_map__name(map));
      m.Set("fd", bpf_map__fd(map));
      m.Set("type", static_cast<double>(bpf_map__type(map)));
      m.Set("keySize", bpf_map__key_size(map));
      m.Set("valueSize", bpf_map__value_size(map));
      m.Set("maxEntries", bpf_map__max_entries(map));
      const char* pin = bpf_map__pin_path(map);
      if (pin && bpf_map__is_pinned(map)) m.Set("pinPath", pin);
      out.Set(i++, m);
    }
    return out;
  }

  // attachCgroup(program, cgroupPath) / attachNetns(program, netnsPath): Promise<BpfLink>.
  Napi::Value Attach(const Napi::CallbackInfo& info, bool netns) {
    Napi::Env env = info.Env();
    bpf_program* prog = Program(env, info[0].As<Napi::String>());
    std::string target = info[1].As<Napi::String>();
    auto link = std::make_shared<bpf_link*>(nullptr);
    pending_++;
    Napi::Reference<Napi::Object> self = Napi::Persistent(Value());
    auto ref = std::make_shared<Napi::Reference<Napi::Object>>(std::move(self));
    return PromiseTask::Run(
        env,
        [prog, target, netns, link, this]() {
          int fd = open(target.c_str(), O_RDONLY | O_CLOEXEC | (netns ? 0 : O_DIRECTORY));
          if (fd < 0) {
            pending_--;
            ThrowSys(errno, "open", target);
          }
          bpf_link* l = netns ? bpf_program__attach_netns(prog, fd) : bpf_program__attach_cgroup(prog, fd);
          int err = l ? 0 : LibbpfErr(l);
          close(fd);
          pending_--;
          if (!l) ThrowSys(err, netns ? "bpf_program__attach_netns" : "bpf_program__attach_cgroup", target);
          *link = l;
        },
        [link, ref](Napi::Env env) -> Napi::Value {
          ref->Reset();
          return BpfLink::Wrap(env, *link);
        });
  }

  Napi::Value AttachCgroup(const Napi::CallbackInfo& info) { return Attach(info, false); }
  Napi::Value AttachNetns(const Napi::CallbackInfo& info) { return Attach(info, true); }

  // Closes the object: programs and maps lose this process's fds. Links and pins keep them alive.
  Napi::Value Close(const Napi::CallbackInfo& info) {
    if (pending_ > 0) throw ToJsError(info.Env(), {EBUSY, "bpf_object__close", path_, ""});
    if (obj_) bpf_object__close(obj_);
    obj_ = nullptr;
    return info.Env().Undefined();
  }

  bpf_object* obj_ = nullptr;
  std::string path_;
  std::atomic<int> pending_{0};

  friend class BpfLink;
};

Napi::Value BpfLink::UpdateProgram(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  BpfObject* obj = BpfObject::Unwrap(info[0].As<Napi::Object>());
  bpf_program* prog = obj->Program(env, info[1].As<Napi::String>());
  int err = bpf_link__update_program(Live(env), prog);
  if (err) throw ToJsError(env, {-err, "bpf_link__update_program", "", TakeLibbpfLog()});
  return env.Undefined();
}

// openPinnedLink(path): a BpfLink for a link pinned by an earlier agent.
Napi::Value OpenPinnedLink(const Napi::CallbackInfo& info) {
  std::string path = info[0].As<Napi::String>();
  bpf_link* link = bpf_link__open(path.c_str());
  if (!link) throw ToJsError(info.Env(), {LibbpfErr(link), "bpf_link__open", path, TakeLibbpfLog()});
  return BpfLink::Wrap(info.Env(), link);
}

// probeBpf(): loads and drops a two-instruction cgroup/connect4 program. That needs what the
// agent needs (bpf() present, CAP_BPF + CAP_NET_ADMIN or CAP_SYS_ADMIN), so "no BPF here" shows
// up at start with its errno instead of at the first enrollment.
Napi::Value ProbeBpf(const Napi::CallbackInfo& info) {
  const struct bpf_insn insns[] = {
      {BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_0, 0, 0, 1},  // r0 = 1 (allow)
      {BPF_JMP | BPF_EXIT, 0, 0, 0, 0},
  };
  LIBBPF_OPTS(bpf_prog_load_opts, opts, .expected_attach_type = BPF_CGROUP_INET4_CONNECT);
  int fd = bpf_prog_load(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, "nm_probe", "GPL", insns, 2, &opts);
  if (fd < 0) throw ToJsError(info.Env(), {errno, "bpf(BPF_PROG_LOAD)", "cgroup/connect4 probe", TakeLibbpfLog()});
  close(fd);
  return info.Env().Undefined();
}

}  // namespace

Napi::Object InitBpf(Napi::Env env, Napi::Object exports, AddonData* data) {
  InstallLibbpfLogger();
  libbpf_set_strict_mode(LIBBPF_STRICT_ALL);
  data->bpfObject = Napi::Persistent(BpfObject::Define(env));
  data->bpfLink = Napi::Persistent(BpfLink::Define(env));
  exports.Set("loadObject", Napi::Function::New(env, BpfObject::Load, "loadObject"));
  exports.Set("openPinnedLink", Napi::Function::New(env, OpenPinnedLink, "openPinnedLink"));
  exports.Set("probeBpf", Napi::Function::New(env, ProbeBpf, "probeBpf"));
  return exports;
}

}  // namespace nodemesh
