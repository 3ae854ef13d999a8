//! The Lua scripts that change the shared state in Redis.
//!
//! Every change that touches more than one key, or that must happen at most once
//! however many schedulers try it, is one script: Redis runs a script to the end
//! before it serves any other command, so a script is a transaction that can also
//! decide (`if ZREM removed it then ...`). That is how two schedulers never hand one
//! job to two workers (only the scheduler whose `ZREM` of the queue entry returned 1
//! records a task), and how an expired lease requeues its worker's jobs exactly once
//! (only the scheduler whose `ZREM` of the lease returned 1 requeues).
//!
//! The scripts compute key names from ids (`job:` .. id), which a Redis Cluster would
//! refuse; cairn talks to one Redis (with replicas or AOF for durability), where this
//! is allowed. Each script is [`COMMON`] followed by its body, so the helpers below
//! exist once. The key layout is documented in [`super::redis_state`].
//!
//! Times come from Redis (`TIME`), not from the schedulers, so leases do not depend on
//! the schedulers' clocks agreeing.

/// Helpers shared by every script.
///
/// - `P`: the key prefix; `CHANNEL`: where changes are published.
/// - `now_ms()`: Redis's clock in milliseconds.
/// - `job_of(task)`: the job id of a task id (`JOB.ATTEMPT`).
/// - `current(task)`: whether `task` is still the attempt its job waits for; a report
///   about an older attempt must change nothing.
/// - `set_stage(id, stage)`: writes the stage (`q`ueued, `e`xecuting) on each of the
///   job's operations and publishes `STAGE NAME` for their watchers.
/// - `status_response(code, message)`: the protobuf bytes of an ExecuteResponse that
///   carries only `status { code, message }` (field 3; Status fields 1 and 2), so a
///   script can fail a job without a round trip back to Rust.
/// - `complete(id, response, retention_ms, remember_ms)`: finishes a job: every
///   operation gets the response, stage `c`, and an expiry of `retention_ms`; the queue
///   entry, the in-flight entry, the deadline, the worker's task and the job go. With a positive
///   `remember_ms` the response stays under `done:DEDUP` that long, so an identical Execute that
///   looked in the action cache just before the worker's upload landed joins this
///   result instead of running the action again.
/// - `requeue(id, counted, cause, max, retention_ms)`: withdraws the job's task and
///   puts it back in its original place; a counted retry beyond `max` completes it
///   with UNAVAILABLE naming `cause` instead. Returns 1 for a counted requeue.
pub const COMMON: &str = r#"
local P = 'cairn:'
local CHANNEL = P .. 'events'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function job_of(task)
  return string.match(task, '^(%d+)%.%d+$')
end

local function current(task)
  local id = job_of(task)
  if not id then return false end
  return redis.call('HGET', P .. 'job:' .. id, 'task') == task
end

local function set_stage(id, stage)
  for _, name in ipairs(redis.call('SMEMBERS', P .. 'job:' .. id .. ':ops')) do
    redis.call('HSET', P .. 'op:' .. name, 'stage', stage)
    redis.call('PUBLISH', CHANNEL, stage .. ' ' .. name)
  end
end

local function varint(n)
  local bytes = ''
  while n >= 128 do
    bytes = bytes .. string.char(n % 128 + 128)
    n = math.floor(n / 128)
  end
  return bytes .. string.char(n)
end

local function status_response(code, message)
  local status = '\8' .. varint(code) .. '\18' .. varint(#message) .. message
  return '\26' .. varint(#status) .. status
end

local function complete(id, response, retention_ms, remember_ms)
  local job = P .. 'job:' .. id
  local fields = redis.call('HMGET', job, 'member', 'dedup', 'task', 'worker')
  local member, dedup, task, worker = fields[1], fields[2], fields[3], fields[4]
  if member then redis.call('ZREM', P .. 'queue', member) end
  redis.call('ZREM', P .. 'running', id)
  if dedup and dedup ~= '' then
    if redis.call('HGET', P .. 'inflight', dedup) == id then
      redis.call('HDEL', P .. 'inflight', dedup)
    end
    if remember_ms > 0 then
      redis.call('SET', P .. 'done:' .. dedup, response, 'PX', remember_ms)
    end
  end
  if task and worker then redis.call('SREM', P .. 'worker:' .. worker .. ':tasks', task) end
  for _, name in ipairs(redis.call('SMEMBERS', job .. ':ops')) do
    local op = P .. 'op:' .. name
    redis.call('HSET', op, 'stage', 'c', 'response', response)
    redis.call('HDEL', op, 'job')
    redis.call('PEXPIRE', op, retention_ms)
    redis.call('PUBLISH', CHANNEL, 'c ' .. name)
  end
  redis.call('DEL', job, job .. ':ops')
end

local function requeue(id, counted, cause, max, retention_ms)
  local job = P .. 'job:' .. id
  if redis.call('EXISTS', job) == 0 then return 0 end
  local fields = redis.call('HMGET', job, 'task', 'worker', 'member')
  if fields[1] and fields[2] then
    redis.call('SREM', P .. 'worker:' .. fields[2] .. ':tasks', fields[1])
  end
  redis.call('HDEL', job, 'task', 'worker', 'started_ms')
  redis.call('ZREM', P .. 'running', id)
  if counted then
    local retries = redis.call('HINCRBY', job, 'retries', 1)
    if retries > max then
      local message = cause .. '; gave up after ' .. retries .. ' attempts at the action'
      complete(id, status_response(14, message), retention_ms, 0)
      return 1
    end
  end
  redis.call('ZADD', P .. 'queue', 0, fields[3])
  set_stage(id, 'q')
  redis.call('PUBLISH', CHANNEL, 'queue')
  if counted then return 1 end
  return 0
end
"#;

/// Execute: joins the in-flight job of an identical action, answers with a result
/// remembered a moment ago, or queues a new job.
///
/// ARGV: dedup key (empty for `do_not_cache`), operation name, Digest bytes, StartTask
/// template bytes, Platform bytes, priority as ten digits (`priority + 2^31`),
/// retention ms, the action's timeout in ms. Returns `{stage, job id}`; stage `c` means the operation is already
/// complete with the remembered response.
pub const EXECUTE: &str = r#"
local dedup, name, digest, start, platform, priority, retention_ms, timeout_ms =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8]
local op = P .. 'op:' .. name
if dedup ~= '' then
  -- An identical action in flight: join its job, at its stage.
  local id = redis.call('HGET', P .. 'inflight', dedup)
  if id and redis.call('EXISTS', P .. 'job:' .. id) == 1 then
    redis.call('SADD', P .. 'job:' .. id .. ':ops', name)
    local stage = 'q'
    if redis.call('HEXISTS', P .. 'job:' .. id, 'task') == 1 then stage = 'e' end
    redis.call('HSET', op, 'digest', digest, 'job', id, 'stage', stage)
    return {stage, id}
  end
  -- Finished a moment ago (see `complete`): the same result.
  local done = redis.call('GET', P .. 'done:' .. dedup)
  if done then
    redis.call('HSET', op, 'digest', digest, 'stage', 'c', 'response', done)
    redis.call('PEXPIRE', op, retention_ms)
    return {'c', ''}
  end
end
-- A new job. The queue is ordered by member (all scores are 0): priority, then the
-- job id, which grows with every job, both zero-padded so text order is number order.
local id = tostring(redis.call('INCR', P .. 'seq'))
local member = priority .. ':' .. string.rep('0', 16 - #id) .. id
local job = P .. 'job:' .. id
redis.call('HSET', job, 'start', start, 'platform', platform, 'member', member,
  'dedup', dedup, 'retries', 0, 'dispatches', 0, 'timeout_ms', timeout_ms)
redis.call('SADD', job .. ':ops', name)
redis.call('ZADD', P .. 'queue', 0, member)
if dedup ~= '' then redis.call('HSET', P .. 'inflight', dedup, id) end
redis.call('HSET', op, 'digest', digest, 'job', id, 'stage', 'q')
redis.call('PUBLISH', CHANNEL, 'queue')
return {'q', id}
"#;

/// Hands the queued job `member` to `worker`, if it is still queued and the worker's
/// registration is still this session's, and sets the task's deadline in `running`:
/// the action's timeout plus a grace for the worker's report.
///
/// ARGV: queue member, worker id, session token, grace ms. Returns the new task id, or
/// nil when another scheduler claimed the job first (or the job is gone, or the lease
/// is lost).
pub const CLAIM: &str = r#"
local member, worker, session, grace_ms = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
if redis.call('HGET', P .. 'worker:' .. worker, 'session') ~= session then return false end
-- Exactly one ZREM of a member returns 1: the scheduler that made it owns the claim.
if redis.call('ZREM', P .. 'queue', member) == 0 then return false end
local id = string.match(member, ':0*(%d+)$')
local job = P .. 'job:' .. id
if redis.call('EXISTS', job) == 0 then return false end
local task = id .. '.' .. redis.call('HINCRBY', job, 'dispatches', 1)
local now = now_ms()
redis.call('HSET', job, 'task', task, 'worker', worker, 'started_ms', now)
local timeout_ms = tonumber(redis.call('HGET', job, 'timeout_ms') or '0')
redis.call('ZADD', P .. 'running', now + timeout_ms + grace_ms, id)
redis.call('SADD', P .. 'worker:' .. worker .. ':tasks', task)
set_stage(id, 'e')
return task
"#;

/// A worker's TaskResult: completes the job if `task` is still its current attempt.
///
/// ARGV: task id, ExecuteResponse bytes, retention ms, remember ms. Returns 1 if the
/// result was taken, 0 if the attempt was no longer current.
pub const RESULT: &str = r#"
local task = ARGV[1]
if not current(task) then return 0 end
complete(job_of(task), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]))
return 1
"#;

/// A worker's TaskRejected: the job goes back to the queue without counting a retry,
/// if `task` is still its current attempt. ARGV: task id. Returns 1 if requeued.
pub const REJECT: &str = r#"
local task = ARGV[1]
if not current(task) then return 0 end
requeue(job_of(task), false, '', 0, 0)
return 1
"#;

/// Registers a worker session and adopts the tasks it still runs.
///
/// ARGV: worker id, session token, lease ms, WorkerInfo bytes, cause (for tasks of an
/// earlier session the worker no longer runs), max retries, retention ms, then the
/// task ids the worker reports running. Tasks recorded for the worker but not reported
/// are requeued (counted); reported tasks still current move to this worker; the
/// others are returned, for the worker to cancel. Returns `{cancelled ids..}`.
pub const REGISTER: &str = r#"
local worker, session, lease_ms, info, cause, max, retention_ms =
  ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local key = P .. 'worker:' .. worker
local reported = {}
for i = 8, #ARGV do reported[ARGV[i]] = true end
for _, task in ipairs(redis.call('SMEMBERS', key .. ':tasks')) do
  if not reported[task] then
    if current(task) then requeue(job_of(task), true, cause, max, retention_ms) end
    redis.call('SREM', key .. ':tasks', task)
  end
end
local cancelled = {}
for i = 8, #ARGV do
  local task = ARGV[i]
  if current(task) then
    local job = P .. 'job:' .. job_of(task)
    local previous = redis.call('HGET', job, 'worker')
    if previous and previous ~= worker then
      redis.call('SREM', P .. 'worker:' .. previous .. ':tasks', task)
    end
    redis.call('HSET', job, 'worker', worker)
    redis.call('SADD', key .. ':tasks', task)
  else
    table.insert(cancelled, task)
  end
end
redis.call('HSET', key, 'session', session, 'info', info)
redis.call('ZADD', P .. 'workers', now_ms() + lease_ms, worker)
return cancelled
"#;

/// Extends a worker's lease (and updates its WorkerInfo), if its registration is still
/// this session's. ARGV: worker id, session token, lease ms, WorkerInfo bytes. Returns
/// 0 when the lease is lost: the session must end.
pub const RENEW: &str = r#"
local worker, session, lease_ms, info = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local key = P .. 'worker:' .. worker
if redis.call('HGET', key, 'session') ~= session then return 0 end
redis.call('HSET', key, 'info', info)
redis.call('ZADD', P .. 'workers', now_ms() + lease_ms, worker)
return 1
"#;

/// Ends a worker session whose stream closed: its lease goes and its tasks are
/// requeued (counted), unless the worker has registered again since (with this
/// scheduler or another). ARGV: worker id, session token, cause, max retries,
/// retention ms. Returns the number of counted requeues.
pub const GONE: &str = r#"
local worker, session, cause, max, retention_ms =
  ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local key = P .. 'worker:' .. worker
if redis.call('HGET', key, 'session') ~= session then return 0 end
redis.call('ZREM', P .. 'workers', worker)
local requeued = 0
for _, task in ipairs(redis.call('SMEMBERS', key .. ':tasks')) do
  if current(task) then requeued = requeued + requeue(job_of(task), true, cause, max, retention_ms) end
end
redis.call('DEL', key, key .. ':tasks')
return requeued
"#;

/// Removes workers whose leases expired and requeues their tasks (counted). Run by
/// every scheduler's ticker; the ZREM makes each expiry happen once.
///
/// ARGV: max retries, retention ms, the lease length in seconds (for the message).
/// Returns `{requeues, expired worker ids..}`.
pub const REAP: &str = r#"
local max, retention_ms, lease_seconds = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local result = {0}
for _, worker in ipairs(redis.call('ZRANGEBYSCORE', P .. 'workers', '-inf', now_ms(), 'LIMIT', 0, 64)) do
  if redis.call('ZREM', P .. 'workers', worker) == 1 then
    local key = P .. 'worker:' .. worker
    local cause = 'worker ' .. worker .. ' sent no keepalive for ' .. lease_seconds .. 's'
    for _, task in ipairs(redis.call('SMEMBERS', key .. ':tasks')) do
      if current(task) then result[1] = result[1] + requeue(job_of(task), true, cause, max, retention_ms) end
    end
    redis.call('DEL', key, key .. ':tasks')
    table.insert(result, worker)
  end
end
return result
"#;

/// Cancels an operation: it completes with the given response at once, and its job is
/// withdrawn unless another operation still waits for it.
///
/// ARGV: operation name, response bytes, retention ms. Returns -1 for an unknown
/// operation, 0 if nothing more is to be done, or `{worker, task}` when the withdrawn
/// job was running, so the worker's scheduler can send CancelTask (published as
/// `cancel WORKER TASK`).
pub const CANCEL: &str = r#"
local name, response, retention_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
local op = P .. 'op:' .. name
if redis.call('EXISTS', op) == 0 then return -1 end
if redis.call('HGET', op, 'stage') == 'c' then return 0 end
local id = redis.call('HGET', op, 'job')
redis.call('HSET', op, 'stage', 'c', 'response', response)
redis.call('HDEL', op, 'job')
redis.call('PEXPIRE', op, retention_ms)
redis.call('PUBLISH', CHANNEL, 'c ' .. name)
if not id then return 0 end
local job = P .. 'job:' .. id
redis.call('SREM', job .. ':ops', name)
if redis.call('SCARD', job .. ':ops') > 0 then return 0 end
local fields = redis.call('HMGET', job, 'member', 'dedup', 'task', 'worker')
if fields[1] then redis.call('ZREM', P .. 'queue', fields[1]) end
if fields[2] and fields[2] ~= '' and redis.call('HGET', P .. 'inflight', fields[2]) == id then
  redis.call('HDEL', P .. 'inflight', fields[2])
end
redis.call('ZREM', P .. 'running', id)
redis.call('DEL', job, job .. ':ops')
if fields[3] and fields[4] then
  redis.call('SREM', P .. 'worker:' .. fields[4] .. ':tasks', fields[3])
  redis.call('PUBLISH', CHANNEL, 'cancel ' .. fields[4] .. ' ' .. fields[3])
end
return 0
"#;

/// Ends the tasks whose deadline in `running` passed without a report (a worker that
/// hangs but still sends keepalives): their operations complete with
/// DEADLINE_EXCEEDED and the worker's scheduler is asked to cancel the task. The ZREM
/// makes each happen once. ARGV: retention ms. Returns how many were ended.
pub const OVERDUE: &str = r#"
local retention_ms = tonumber(ARGV[1])
local ended = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'running', '-inf', now_ms(), 'LIMIT', 0, 64)) do
  if redis.call('ZREM', P .. 'running', id) == 1 then
    local fields = redis.call('HMGET', P .. 'job:' .. id, 'task', 'worker', 'timeout_ms')
    if fields[1] then
      if fields[2] then
        redis.call('PUBLISH', CHANNEL, 'cancel ' .. fields[2] .. ' ' .. fields[1])
      end
      local message = 'the action exceeded its timeout of ' .. tonumber(fields[3] or '0') / 1000
        .. 's and its worker did not report back'
      complete(id, status_response(4, message), retention_ms, 0)
      ended = ended + 1
    end
  end
end
return ended
"#;

/// Fails a job that is still queued (no worker can run it), so that exactly one
/// scheduler does. ARGV: job id, response bytes, retention ms. Returns 1 if failed.
pub const FAIL_QUEUED: &str = r#"
local id = ARGV[1]
local job = P .. 'job:' .. id
if redis.call('EXISTS', job) == 0 or redis.call('HEXISTS', job, 'task') == 1 then return 0 end
complete(id, ARGV[2], tonumber(ARGV[3]), 0)
return 1
"#;

/// The scripts against a real `redis-server` (started on a free loopback port; the
/// tests fail, saying why, when it is not installed).
#[cfg(test)]
mod tests {
    use cairn_proto::reapi::ExecuteResponse;
    use prost::Message;
    use redis::{Commands, Connection, Script};

    use super::*;

    struct Server {
        child: std::process::Child,
        _dir: tempfile::TempDir,
        connection: Connection,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn server() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = std::process::Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!("cannot start redis-server ({error}): install it (scripts/install-deps.sh)")
            });
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).unwrap();
        for _ in 0..500 {
            if let Ok(connection) = client.get_connection() {
                return Server {
                    child,
                    _dir: dir,
                    connection,
                };
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("redis-server did not answer on port {port}");
    }

    fn script(body: &str) -> Script {
        Script::new(&format!("{COMMON}{body}"))
    }

    /// Queues a job for operation `name` and returns its queue member.
    fn queue(connection: &mut Connection, name: &str, dedup: &str) -> String {
        let _: Vec<String> = script(EXECUTE)
            .arg(dedup)
            .arg(name)
            .arg(b"digest".as_slice())
            .arg(b"start".as_slice())
            .arg(b"".as_slice())
            .arg("2147483648")
            .arg(60_000)
            .arg(0)
            .invoke(connection)
            .unwrap();
        let members: Vec<String> = connection.zrange("cairn:queue", -1, -1).unwrap();
        members[0].clone()
    }

    fn register(connection: &mut Connection, worker: &str, session: &str, lease_ms: u64) {
        let _: Vec<String> = script(REGISTER)
            .arg(worker)
            .arg(session)
            .arg(lease_ms)
            .arg(b"".as_slice())
            .arg("cause")
            .arg(3)
            .arg(60_000)
            .invoke(connection)
            .unwrap();
    }

    fn claim(
        connection: &mut Connection,
        member: &str,
        worker: &str,
        session: &str,
    ) -> Option<String> {
        script(CLAIM)
            .arg(member)
            .arg(worker)
            .arg(session)
            .arg(60_000)
            .invoke(connection)
            .unwrap()
    }

    #[test]
    fn status_response_is_an_execute_response() {
        let mut server = server();
        let message = "x".repeat(300);
        let bytes: Vec<u8> = Script::new(&format!("{COMMON}\nreturn status_response(14, ARGV[1])"))
            .arg(&message)
            .invoke(&mut server.connection)
            .unwrap();
        let response = ExecuteResponse::decode(bytes.as_slice()).unwrap();
        let status = response.status.unwrap();
        assert_eq!(status.code, 14);
        assert_eq!(status.message, message);
    }

    #[test]
    fn a_job_is_claimed_once_and_identical_actions_share_it() {
        let mut server = server();
        let connection = &mut server.connection;
        let member = queue(connection, "op1", "key");
        queue(connection, "op2", "key");
        assert_eq!(connection.zcard::<_, u64>("cairn:queue").unwrap(), 1);
        register(connection, "w1", "s1", 60_000);
        register(connection, "w2", "s2", 60_000);
        assert_eq!(
            claim(connection, &member, "w1", "s1").as_deref(),
            Some("1.1")
        );
        assert_eq!(claim(connection, &member, "w2", "s2"), None);
        for op in ["op1", "op2"] {
            let stage: String = connection.hget(format!("cairn:op:{op}"), "stage").unwrap();
            assert_eq!(stage, "e");
        }
        // A session that lost the registration claims nothing.
        let other = queue(connection, "op3", "other");
        assert_eq!(claim(connection, &other, "w2", "stale"), None);
    }

    #[test]
    fn an_expired_lease_is_requeued_once_and_a_late_result_is_ignored() {
        let mut server = server();
        let connection = &mut server.connection;
        let member = queue(connection, "op1", "key");
        register(connection, "w1", "s1", 0);
        assert_eq!(
            claim(connection, &member, "w1", "s1").as_deref(),
            Some("1.1")
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
        let reap = script(REAP);
        let first: Vec<redis::Value> = reap.arg(3).arg(60_000).arg(30).invoke(connection).unwrap();
        let second: Vec<redis::Value> = reap.arg(3).arg(60_000).arg(30).invoke(connection).unwrap();
        assert_eq!(
            redis::from_redis_value::<Vec<String>>(redis::Value::Array(first)).unwrap(),
            ["1", "w1"]
        );
        assert_eq!(
            redis::from_redis_value::<Vec<String>>(redis::Value::Array(second)).unwrap(),
            ["0"]
        );
        assert_eq!(connection.zcard::<_, u64>("cairn:queue").unwrap(), 1);
        let retries: u32 = connection.hget("cairn:job:1", "retries").unwrap();
        assert_eq!(retries, 1);
        let taken: i64 = script(RESULT)
            .arg("1.1")
            .arg(b"late".as_slice())
            .arg(60_000)
            .arg(0)
            .invoke(connection)
            .unwrap();
        assert_eq!(taken, 0, "the expired attempt's result changes nothing");
        register(connection, "w2", "s2", 60_000);
        assert_eq!(
            claim(connection, &member, "w2", "s2").as_deref(),
            Some("1.2")
        );
        let taken: i64 = script(RESULT)
            .arg("1.2")
            .arg(b"done".as_slice())
            .arg(60_000)
            .arg(0)
            .invoke(connection)
            .unwrap();
        assert_eq!(taken, 1);
        let response: Vec<u8> = connection.hget("cairn:op:op1", "response").unwrap();
        assert_eq!(response, b"done");
        assert!(!connection.exists::<_, bool>("cairn:job:1").unwrap());
        assert!(!connection
            .hexists::<_, _, bool>("cairn:inflight", "key")
            .unwrap());
    }

    #[test]
    fn a_task_past_its_deadline_ends_with_deadline_exceeded_once() {
        let mut server = server();
        let connection = &mut server.connection;
        let member = queue(connection, "op1", "key");
        register(connection, "w1", "s1", 60_000);
        let task: Option<String> = script(CLAIM)
            .arg(&member)
            .arg("w1")
            .arg("s1")
            .arg(0)
            .invoke(connection)
            .unwrap();
        assert_eq!(task.as_deref(), Some("1.1"));
        std::thread::sleep(std::time::Duration::from_millis(5));
        let overdue = script(OVERDUE);
        let ended: i64 = overdue.arg(60_000).invoke(connection).unwrap();
        assert_eq!(ended, 1);
        let ended: i64 = overdue.arg(60_000).invoke(connection).unwrap();
        assert_eq!(ended, 0);
        let response: Vec<u8> = connection.hget("cairn:op:op1", "response").unwrap();
        let status = ExecuteResponse::decode(response.as_slice())
            .unwrap()
            .status
            .unwrap();
        assert_eq!(status.code, 4);
        assert!(
            status.message.contains("timeout of 0s"),
            "{}",
            status.message
        );
        assert!(!connection.exists::<_, bool>("cairn:job:1").unwrap());
        let tasks: Vec<String> = connection.smembers("cairn:worker:w1:tasks").unwrap();
        assert!(tasks.is_empty());
    }

    #[test]
    fn a_reregistering_worker_keeps_current_tasks_and_cancels_the_rest() {
        let mut server = server();
        let connection = &mut server.connection;
        let member = queue(connection, "op1", "a");
        register(connection, "w1", "s1", 60_000);
        assert_eq!(
            claim(connection, &member, "w1", "s1").as_deref(),
            Some("1.1")
        );
        let cancelled: Vec<String> = script(REGISTER)
            .arg("w1")
            .arg("s2")
            .arg(60_000)
            .arg(b"".as_slice())
            .arg("cause")
            .arg(3)
            .arg(60_000)
            .arg("1.1")
            .arg("9.1")
            .invoke(connection)
            .unwrap();
        assert_eq!(cancelled, ["9.1"]);
        let task: String = connection.hget("cairn:job:1", "task").unwrap();
        assert_eq!(task, "1.1");
        // The old session's end changes nothing now.
        let requeued: i64 = script(GONE)
            .arg("w1")
            .arg("s1")
            .arg("gone")
            .arg(3)
            .arg(60_000)
            .invoke(connection)
            .unwrap();
        assert_eq!(requeued, 0);
        assert_eq!(connection.zcard::<_, u64>("cairn:queue").unwrap(), 0);
    }
}
