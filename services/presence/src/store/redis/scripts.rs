//! The Lua scripts of the Redis session store. Each touches the keys of ONE hash tag
//! (one shard or one user), passed in `KEYS`, so every script runs on one Redis
//! Cluster slot. Session records and user entries are JSON (`cjson`).
//!
//! Session record (`<p>:{x<n>}:sess`, field = session id):
//! `{"u": user, "g": gateway URL, "d": device, "dl": deadline ms, "sn": last seen ms,
//!   "gen": registration generation, "x": 1 while being expired}`.
//! User entry (`<p>:{u:<user>}`, field `s:<session id>`): `{"st": status, "gen", "g",
//! "a": 1 when the status is an automatic away}`; field `seen` holds the last-seen
//! time of the user's removed sessions (and registrations), field `vseen` the
//! visible last seen (when the user last stopped being visibly present).
//! User settings (`<p>:{u:<user>}:settings`, hash, no TTL): `text` -> status text,
//! `privacy` -> `contacts` or `nobody`; absent fields are the defaults (`""`,
//! `everyone`), and the key is gone when both are.
//! Interest (`<p>:{u:<user>}:convs`, sorted set): conversation id, score = expiry (ms)
//! of the interest entry that lists the user as a member.
//! Conversation routes (`<p>:{c:<conv>}:routes`, hash): `fp` -> member fingerprint,
//! `exp` -> expiry ms, `g:<gateway>` -> JSON array of the online members there;
//! `<p>:{c:<conv>}:gen` counts the invalidations of the conversation's entry.

use redis::Script;

/// Register or refresh a session in its shard.
/// KEYS: sess, deadlines, by_gateway. ARGV: sid, user, gateway, device, now, deadline, gen.
/// Returns `{"ok", previous gateway or ""}` or `{"other", owner}` when the id is live
/// for another user.
const SHARD_REGISTER: &str = r#"
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local old_gw = ''
if raw then
  local r = cjson.decode(raw)
  if r.u ~= ARGV[2] then return {'other', r.u} end
  old_gw = r.g
  if r.g ~= ARGV[3] then redis.call('ZREM', KEYS[3], r.g .. '\0' .. ARGV[1]) end
end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode({u = ARGV[2], g = ARGV[3], d = ARGV[4],
  dl = tonumber(ARGV[6]), sn = tonumber(ARGV[5]), gen = ARGV[7]}))
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[1])
redis.call('ZADD', KEYS[3], 0, ARGV[3] .. '\0' .. ARGV[1])
return {'ok', old_gw}
"#;

/// Refresh the deadline and last-seen of the sessions of one gateway in one shard.
/// KEYS: sess, deadlines. ARGV: gateway, now, deadline, sid... Returns the ids that are
/// not live sessions of that gateway (unknown, elsewhere, or being expired).
const SHARD_HEARTBEAT: &str = r#"
local unknown = {}
local gw = ARGV[1]
local now = tonumber(ARGV[2])
local dl = tonumber(ARGV[3])
for i = 4, #ARGV do
  local sid = ARGV[i]
  local raw = redis.call('HGET', KEYS[1], sid)
  local live = false
  if raw then
    local r = cjson.decode(raw)
    if r.g == gw and not r.x then
      r.dl = dl
      if now > r.sn then r.sn = now end
      redis.call('HSET', KEYS[1], sid, cjson.encode(r))
      redis.call('ZADD', KEYS[2], ARGV[3], sid)
      live = true
    end
  end
  if not live then unknown[#unknown + 1] = sid end
end
return unknown
"#;

/// Remove one session from its shard (clean close).
/// KEYS: sess, deadlines, by_gateway. ARGV: sid. Returns nil or `{user, gateway, gen}`.
const SHARD_REMOVE: &str = r#"
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return false end
local r = cjson.decode(raw)
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], r.g .. '\0' .. ARGV[1])
return {r.u, r.g, r.gen}
"#;

/// Claim the due sessions of one shard for expiry: mark them, move their deadline to
/// the lease end (so a crashed sweeper's claims are retried after the lease) and return
/// them. Only one caller gets each due session.
/// KEYS: sess, deadlines. ARGV: now, lease end, limit.
/// Returns a flat list of `sid, user, gen, last seen` quadruples.
const SHARD_SWEEP: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, sid in ipairs(due) do
  local raw = redis.call('HGET', KEYS[1], sid)
  if not raw then
    redis.call('ZREM', KEYS[2], sid)
  else
    local r = cjson.decode(raw)
    r.x = 1
    redis.call('HSET', KEYS[1], sid, cjson.encode(r))
    redis.call('ZADD', KEYS[2], ARGV[2], sid)
    out[#out + 1] = sid
    out[#out + 1] = r.u
    out[#out + 1] = r.gen
    out[#out + 1] = string.format('%d', r.sn)
  end
end
return out
"#;

/// Delete claimed sessions whose generation is unchanged (not registered again since
/// the claim). KEYS: sess, deadlines, by_gateway. ARGV: sid, gen, sid, gen, ...
const SHARD_FINISH: &str = r#"
local n = 0
for i = 1, #ARGV, 2 do
  local sid = ARGV[i]
  local raw = redis.call('HGET', KEYS[1], sid)
  if raw then
    local r = cjson.decode(raw)
    if r.x and r.gen == ARGV[i + 1] then
      redis.call('HDEL', KEYS[1], sid)
      redis.call('ZREM', KEYS[2], sid)
      redis.call('ZREM', KEYS[3], r.g .. '\0' .. sid)
      n = n + 1
    end
  end
end
return n
"#;

/// Remove up to `limit` sessions of a gateway from one shard.
/// KEYS: sess, deadlines, by_gateway. ARGV: gateway, limit.
/// Returns a flat list of `sid, user, gen` triples.
const SHARD_DROP: &str = r#"
local gw = ARGV[1]
local members = redis.call('ZRANGEBYLEX', KEYS[3], '[' .. gw .. '\0', '(' .. gw .. '\1',
  'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
local skip = #gw + 2
for _, m in ipairs(members) do
  local sid = string.sub(m, skip)
  redis.call('ZREM', KEYS[3], m)
  local raw = redis.call('HGET', KEYS[1], sid)
  if raw then
    local r = cjson.decode(raw)
    if r.g == gw then
      redis.call('HDEL', KEYS[1], sid)
      redis.call('ZREM', KEYS[2], sid)
      out[#out + 1] = sid
      out[#out + 1] = r.u
      out[#out + 1] = r.gen
    end
  end
end
return out
"#;

/// Shared by the user scripts: aggregate a user hash, drop the watches a user holds
/// through a gateway where it has no session left, and list the conversations whose
/// interest entry lists the user (when its gateways changed).
/// A user script returns `{before, after, sessions, seen, {sid...}, unlinked gateway,
/// {unlinked watched user...}, {conversation to invalidate...}}`.
const USER_LIB: &str = r#"
local RANK = {invisible = 1, busy = 2, away = 3, online = 4}
local function visible(st)
  return st == 'online' or st == 'away' or st == 'busy'
end
local function agg(h)
  local flat = redis.call('HGETALL', h)
  local best = 'offline'
  local best_rank = 0
  local n = 0
  local seen = 0
  local vseen = 0
  local sids = {}
  local gws = {}
  for i = 1, #flat, 2 do
    local f = flat[i]
    if f == 'seen' then
      seen = tonumber(flat[i + 1])
    elseif f == 'vseen' then
      vseen = tonumber(flat[i + 1])
    elseif string.sub(f, 1, 2) == 's:' then
      local e = cjson.decode(flat[i + 1])
      n = n + 1
      sids[#sids + 1] = string.sub(f, 3)
      gws[e.g] = true
      local r = RANK[e.st] or RANK.online
      if r > best_rank then
        best_rank = r
        best = e.st
      end
    end
  end
  return best, n, seen, sids, gws, vseen
end
local function unlink(watching, gw)
  local members = redis.call('ZRANGEBYLEX', watching, '[' .. gw .. '\0', '(' .. gw .. '\1')
  local out = {}
  local skip = #gw + 2
  for _, m in ipairs(members) do out[#out + 1] = string.sub(m, skip) end
  if #members > 0 then
    redis.call('ZREMRANGEBYLEX', watching, '[' .. gw .. '\0', '(' .. gw .. '\1')
  end
  return out
end
local function same_set(a, b)
  for k, _ in pairs(a) do if not b[k] then return false end end
  for k, _ in pairs(b) do if not a[k] then return false end end
  return true
end
local function interested(convs, now)
  redis.call('ZREMRANGEBYSCORE', convs, '-inf', '(' .. now)
  return redis.call('ZRANGE', convs, 0, -1)
end
local function raise(h, field, t)
  local old = tonumber(redis.call('HGET', h, field) or '0')
  if t > old then redis.call('HSET', h, field, string.format('%d', t)) end
end
local function raise_seen(h, t)
  raise(h, 'seen', t)
end
-- The user stopped being visibly present at t: remember it as the visible last seen.
local function note_visibility(h, before, after, t)
  if visible(before) and not visible(after) then raise(h, 'vseen', t) end
end
"#;

/// Add or refresh a session in its user's hash: a new session gets the given status
/// (and automatic mark), a refreshed one keeps its own. KEYS: user, watching, convs.
/// ARGV: sid, gen, gateway, now, status, "1" for an automatic away or "".
const USER_ADD: &str = r#"
local before, _, _, _, gws_before = agg(KEYS[1])
local f = 's:' .. ARGV[1]
local raw = redis.call('HGET', KEYS[1], f)
local st = ARGV[5]
local auto = nil
if ARGV[6] == '1' then auto = 1 end
local old_gw = nil
if raw then
  local e = cjson.decode(raw)
  st = e.st
  auto = e.a
  old_gw = e.g
end
redis.call('HSET', KEYS[1], f, cjson.encode({st = st, gen = ARGV[2], g = ARGV[3], a = auto}))
raise_seen(KEYS[1], tonumber(ARGV[4]))
redis.call('PERSIST', KEYS[1])
local after, n, seen, sids, gws, vseen = agg(KEYS[1])
local unlinked = {}
local unlinked_gw = ''
if old_gw and old_gw ~= ARGV[3] and not gws[old_gw] then
  unlinked_gw = old_gw
  unlinked = unlink(KEYS[2], old_gw)
end
local convs = {}
if not same_set(gws_before, gws) then convs = interested(KEYS[3], ARGV[4]) end
return {before, after, n, seen, sids, unlinked_gw, unlinked, convs, vseen}
"#;

/// Remove a session from its user's hash when its generation matches (an empty gen
/// matches any). KEYS: user, watching, convs. ARGV: sid, gen, seen at, retention ms.
/// Returns nil when the entry is absent or of another generation.
const USER_REMOVE: &str = r#"
local f = 's:' .. ARGV[1]
local raw = redis.call('HGET', KEYS[1], f)
if not raw then return false end
local e = cjson.decode(raw)
if ARGV[2] ~= '' and e.gen ~= ARGV[2] then return false end
local before = agg(KEYS[1])
redis.call('HDEL', KEYS[1], f)
raise_seen(KEYS[1], tonumber(ARGV[3]))
local after = agg(KEYS[1])
note_visibility(KEYS[1], before, after, tonumber(ARGV[3]))
local _, n, seen, sids, gws, vseen = agg(KEYS[1])
local unlinked = {}
local unlinked_gw = ''
local convs = {}
if not gws[e.g] then
  unlinked_gw = e.g
  unlinked = unlink(KEYS[2], e.g)
  convs = interested(KEYS[3], ARGV[3])
end
if n == 0 then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
return {before, after, n, seen, sids, unlinked_gw, unlinked, convs, vseen}
"#;

/// Apply a SetStatus: the session's status in its user's hash (routes do not
/// change) and the user's settings, in one atomic step.
/// KEYS: user, watching, convs, settings.
/// ARGV: sid, status ("" = unchanged), automatic ("1"/"0"), has text ("1"/"0"), text,
/// privacy ("" = unchanged), now.
/// An automatic "away" replaces only "online" (and marks the entry `a`); an automatic
/// "online" only undoes a marked "away"; an explicit status clears the mark.
/// Returns nil when the session is not there, else
/// `{{user reply}, {text, privacy, settings changed 0/1}}`.
const USER_STATUS: &str = r#"
local f = 's:' .. ARGV[1]
local raw = redis.call('HGET', KEYS[1], f)
if not raw then return false end
local before = agg(KEYS[1])
local e = cjson.decode(raw)
local st = ARGV[2]
if st ~= '' then
  if ARGV[3] == '1' then
    if st == 'away' and e.st == 'online' then
      e.st = 'away'
      e.a = 1
    elseif st == 'online' and e.st == 'away' and e.a then
      e.st = 'online'
      e.a = nil
    end
  else
    e.st = st
    e.a = nil
  end
  redis.call('HSET', KEYS[1], f, cjson.encode(e))
end
local text = redis.call('HGET', KEYS[4], 'text') or ''
local privacy = redis.call('HGET', KEYS[4], 'privacy') or 'everyone'
local changed = 0
if ARGV[4] == '1' and ARGV[5] ~= text then
  changed = 1
  text = ARGV[5]
  if text == '' then redis.call('HDEL', KEYS[4], 'text') else redis.call('HSET', KEYS[4], 'text', text) end
end
if ARGV[6] ~= '' and ARGV[6] ~= privacy then
  changed = 1
  privacy = ARGV[6]
  if privacy == 'everyone' then
    redis.call('HDEL', KEYS[4], 'privacy')
  else
    redis.call('HSET', KEYS[4], 'privacy', privacy)
  end
end
local after, n, seen, sids, _, _ = agg(KEYS[1])
note_visibility(KEYS[1], before, after, tonumber(ARGV[7]))
local vseen = tonumber(redis.call('HGET', KEYS[1], 'vseen') or '0')
return {{before, after, n, seen, sids, '', {}, {}, vseen}, {text, privacy, changed}}
"#;

/// Record watches of the watcher (KEYS[1] is the watcher's user hash) through a
/// gateway, capped per gateway. KEYS: user, watching, convs. ARGV: gateway, cap, user...
/// Returns `{0, total}` when added, `{1, 0}` without a session on that gateway,
/// `{2, total}` above the cap (nothing added).
const USER_WATCH: &str = r#"
local _, _, _, _, gws = agg(KEYS[1])
local gw = ARGV[1]
if not gws[gw] then return {1, 0} end
local prefix = gw .. '\0'
local current = redis.call('ZLEXCOUNT', KEYS[2], '[' .. prefix, '(' .. gw .. '\1')
local fresh = {}
local added = 0
for i = 3, #ARGV do
  local m = prefix .. ARGV[i]
  if not fresh[m] and not redis.call('ZSCORE', KEYS[2], m) then
    fresh[m] = true
    added = added + 1
  end
end
local total = current + added
if total > tonumber(ARGV[2]) then return {2, total} end
for m, _ in pairs(fresh) do redis.call('ZADD', KEYS[2], 0, m) end
return {0, total}
"#;

/// Cache a conversation's routes unless its entry was invalidated since the caller
/// read the generation (the caller then answers without caching).
/// KEYS: routes, gen. ARGV: generation read ("0" when absent), fingerprint, expiry ms,
/// key TTL ms, then gateway, packed members, gateway, packed members, ...
/// Returns 1 when stored, 0 when refused.
const CONV_STORE: &str = r#"
local gen = redis.call('GET', KEYS[2]) or '0'
if gen ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'fp', ARGV[2], 'exp', ARGV[3])
for i = 5, #ARGV, 2 do
  redis.call('HSET', KEYS[1], 'g:' .. ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"#;

/// Drop a conversation's cached routes and bump its generation (so that a
/// computation that started before cannot store its result).
/// KEYS: routes, gen. ARGV: generation TTL ms. Returns 1 when an entry was dropped.
const CONV_INVALIDATE: &str = r#"
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return redis.call('DEL', KEYS[1])
"#;

/// Every script of the store, compiled once (the SHA1 is what `EVALSHA` sends).
pub(super) struct Scripts {
    pub shard_register: Script,
    pub shard_heartbeat: Script,
    pub shard_remove: Script,
    pub shard_sweep: Script,
    pub shard_finish: Script,
    pub shard_drop: Script,
    pub user_add: Script,
    pub user_remove: Script,
    pub user_status: Script,
    pub user_watch: Script,
    pub conv_store: Script,
    pub conv_invalidate: Script,
}

impl Scripts {
    pub fn new() -> Scripts {
        let user = |body: &str| Script::new(&format!("{USER_LIB}{body}"));
        Scripts {
            shard_register: Script::new(SHARD_REGISTER),
            shard_heartbeat: Script::new(SHARD_HEARTBEAT),
            shard_remove: Script::new(SHARD_REMOVE),
            shard_sweep: Script::new(SHARD_SWEEP),
            shard_finish: Script::new(SHARD_FINISH),
            shard_drop: Script::new(SHARD_DROP),
            user_add: user(USER_ADD),
            user_remove: user(USER_REMOVE),
            user_status: user(USER_STATUS),
            user_watch: user(USER_WATCH),
            conv_store: Script::new(CONV_STORE),
            conv_invalidate: Script::new(CONV_INVALIDATE),
        }
    }

    pub fn all(&self) -> [&Script; 12] {
        [
            &self.shard_register,
            &self.shard_heartbeat,
            &self.shard_remove,
            &self.shard_sweep,
            &self.shard_finish,
            &self.shard_drop,
            &self.user_add,
            &self.user_remove,
            &self.user_status,
            &self.user_watch,
            &self.conv_store,
            &self.conv_invalidate,
        ]
    }
}
