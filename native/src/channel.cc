// SPDX-License-Identifier: Apache-2.0
// Channels between the engines of the JS thread's loop (channel.h): the ids JS hands from one
// engine to the other, and the notices each side gets on the loop's next turn.
#include "channel.h"

namespace nodemesh {

ChannelRegistry& Channels() {
  static ChannelRegistry* r = new ChannelRegistry();  // lives as long as the process
  return *r;
}

Channel::~Channel() { Channels().live--; }

uint32_t Channel::Make() {
  ChannelRegistry& r = Channels();
  auto ch = std::make_shared<Channel>();
  r.live++;
  r.made++;
  ch->self_ = ch;
  do r.next = r.next == UINT32_MAX ? 1 : r.next + 1;
  while (r.open.count(r.next) != 0);
  r.open[r.next].channel = std::move(ch);
  return r.next;
}

std::shared_ptr<Channel> Channel::Take(uint32_t id, int side) {
  ChannelRegistry& r = Channels();
  auto it = r.open.find(id);
  if (it == r.open.end() || it->second.taken[side]) return nullptr;
  it->second.taken[side] = true;
  std::shared_ptr<Channel> ch = it->second.channel;
  if (it->second.taken[1 - side]) r.open.erase(it);
  return ch;
}

void Channel::Notify(int side) {
  if (noticed_[side] || !ends_[side]) return;
  std::shared_ptr<Channel> self = self_.lock();
  if (!self) return;
  noticed_[side] = true;
  ChannelRegistry& r = Channels();
  r.notices.emplace_back(std::move(self), side);
  if (r.notices.size() == 1 && r.idle) {
    uv_check_start(r.check, [](uv_check_t*) { RunNotices(); });
    uv_idle_start(r.idle, [](uv_idle_t*) { RunNotices(); });
  }
}

// One batch at a time: what a side does when told may notify again, for the next batch. Run
// right after the loop's I/O callbacks (check) so that what one engine did for a socket event
// reaches the other in the same turn; the idle handle keeps the loop's next poll from blocking
// while notices wait.
void Channel::RunNotices() {
  ChannelRegistry& r = Channels();
  std::vector<std::pair<std::shared_ptr<Channel>, int>> batch;
  batch.swap(r.notices);
  for (auto& [ch, side] : batch) {
    ch->noticed_[side] = false;
    if (ch->ends_[side]) ch->ends_[side]->ChannelChanged();
  }
  for (auto fn : r.afterBatch) fn();
  if (r.notices.empty()) {
    uv_check_stop(r.check);
    uv_idle_stop(r.idle);
  }
}

std::shared_ptr<Channel> ChannelArg(const Napi::Value& v, int side, const char* who) {
  if (!v.IsObject()) return nullptr;
  uint32_t id = v.As<Napi::Object>().Get("channel").As<Napi::Number>().Uint32Value();
  std::shared_ptr<Channel> ch = Channel::Take(id, side);
  if (!ch) throw Napi::Error::New(v.Env(), std::string(who) + ": channel " + std::to_string(id) + " is unknown or taken");
  return ch;
}

namespace {

// channelNew(): the id of a new channel, for one engine's side 0 and the other's side 1.
Napi::Value New(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), Channel::Make()); }

// channelDrop(id, side): JS gives up a side of a channel it made that no engine took (0 the HTTP
// engine's, 1 the HBONE stream's): the other side reads a reset. Nothing happens if it was taken.
Napi::Value Drop(const Napi::CallbackInfo& info) {
  int side = info[1].As<Napi::Number>().Int32Value() == 1 ? 1 : 0;
  auto ch = Channel::Take(info[0].As<Napi::Number>().Uint32Value(), side);
  if (ch) ch->Close(side, true);
  return info.Env().Undefined();
}

// channelStats(): {open, unclaimed, made}: channels either engine still holds, ids no engine took
// yet, and how many were made.
Napi::Value Stats(const Napi::CallbackInfo& info) {
  ChannelRegistry& r = Channels();
  Napi::Object o = Napi::Object::New(info.Env());
  o.Set("open", Napi::Number::New(info.Env(), static_cast<double>(r.live)));
  o.Set("unclaimed", Napi::Number::New(info.Env(), static_cast<double>(r.open.size())));
  o.Set("made", Napi::Number::New(info.Env(), static_cast<double>(r.made)));
  return o;
}

}  // namespace

void InitChannel(Napi::Env env, Napi::Object exports) {
  ChannelRegistry& r = Channels();
  if (!r.idle) {
    uv_loop_t* loop = nullptr;
    napi_get_uv_event_loop(env, &loop);
    r.idle = new uv_idle_t;
    uv_idle_init(loop, r.idle);
    r.check = new uv_check_t;
    uv_check_init(loop, r.check);
    uv_unref(reinterpret_cast<uv_handle_t*>(r.check));
    // Pending notices keep the loop turning (an idle handle makes its poll not block), but a
    // channel alone does not keep the process alive: its engines' sockets do.
    uv_unref(reinterpret_cast<uv_handle_t*>(r.idle));
  }
  exports.Set("channelNew", Napi::Function::New(env, New, "channelNew"));
  exports.Set("channelDrop", Napi::Function::New(env, Drop, "channelDrop"));
  exports.Set("channelStats", Napi::Function::New(env, Stats, "channelStats"));
}

}  // namespace nodemesh
