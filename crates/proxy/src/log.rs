//! Envoy's log, from `tracing` events: one line per event in Envoy's default format
//! (`[%Y-%m-%d %T.%e][%t][%l][%n] [%g:%#] %v`), the event's target as Envoy's component name
//! (`conn_handler`, `filter`, `upstream`, ...), `[C<n>]` before the message of every event about a
//! connection (`[C<n>][S<n>]` about one of its HTTP streams), and a level per component that
//! `/logging` changes at run time.

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// Envoy's logger names: the ones `/logging` lists and `--component-log-level` takes.
pub const COMPONENTS: &[&str] = &[
    "admin",
    "client",
    "config",
    "connection",
    "conn_handler",
    "filter",
    "hc",
    "http",
    "main",
    "misc",
    "pool",
    "router",
    "runtime",
    "upstream",
];

/// Envoy's levels, most verbose first.
pub const LEVELS: &[&str] = &[
    "trace", "debug", "info", "warning", "error", "critical", "off",
];

static COMPONENT_LEVELS: [AtomicU8; COMPONENTS.len()] =
    [const { AtomicU8::new(2) }; COMPONENTS.len()];

pub fn level_index(name: &str) -> Option<u8> {
    // Envoy takes `warn` on the command line and `warning` on /logging; both name one level.
    let name = if name == "warn" { "warning" } else { name };
    LEVELS.iter().position(|l| *l == name).map(|i| i as u8)
}

fn component_index(name: &str) -> Option<usize> {
    COMPONENTS.iter().position(|c| *c == name)
}

/// Sets every component's level.
pub fn set_all(level: u8) {
    for l in &COMPONENT_LEVELS {
        l.store(level, Ordering::Relaxed);
    }
}

/// Sets one component's level; false when there is no such component.
pub fn set(component: &str, level: u8) -> bool {
    match component_index(component) {
        Some(i) => {
            COMPONENT_LEVELS[i].store(level, Ordering::Relaxed);
            true
        }
        None => false,
    }
}

/// Every component and its level, in Envoy's `/logging` order (by name).
pub fn levels() -> Vec<(&'static str, &'static str)> {
    let mut v: Vec<_> = COMPONENTS
        .iter()
        .enumerate()
        .map(|(i, c)| {
            (
                *c,
                LEVELS[COMPONENT_LEVELS[i].load(Ordering::Relaxed) as usize],
            )
        })
        .collect();
    v.sort();
    v
}

fn tracing_level_index(l: &Level) -> u8 {
    match *l {
        Level::TRACE => 0,
        Level::DEBUG => 1,
        Level::INFO => 2,
        Level::WARN => 3,
        Level::ERROR => 4,
    }
}

fn enabled_for(meta: &Metadata) -> bool {
    let c = component_index(meta.target()).unwrap_or(component_index("misc").unwrap());
    tracing_level_index(meta.level()) >= COMPONENT_LEVELS[c].load(Ordering::Relaxed)
}

/// The layer that writes Envoy's lines to standard error or `--log-path`.
pub struct EnvoyLog {
    out: Mutex<Box<dyn Write + Send>>,
}

impl EnvoyLog {
    pub fn new(out: Box<dyn Write + Send>) -> EnvoyLog {
        EnvoyLog {
            out: Mutex::new(out),
        }
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    connection: Option<u64>,
    stream: Option<u64>,
}

impl Visit for Fields {
    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "connection" => self.connection = Some(value),
            "stream" => self.stream = Some(value),
            _ => {}
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        }
    }
}

impl<S: Subscriber> Layer<S> for EnvoyLog {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> tracing::subscriber::Interest {
        // Levels change at run time, so every event is asked again.
        tracing::subscriber::Interest::sometimes()
    }

    fn enabled(&self, meta: &Metadata<'_>, _: Context<'_, S>) -> bool {
        enabled_for(meta)
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let meta = event.metadata();
        if !enabled_for(meta) {
            return;
        }
        let mut f = Fields::default();
        event.record(&mut f);
        let level = match *meta.level() {
            Level::TRACE => "trace",
            Level::DEBUG => "debug",
            Level::INFO => "info",
            Level::WARN => "warning",
            Level::ERROR => "error",
        };
        let component = if component_index(meta.target()).is_some() {
            meta.target()
        } else {
            "misc"
        };
        let conn = match (f.connection, f.stream) {
            (Some(c), Some(s)) => format!("[C{c}][S{s}] "),
            (Some(c), None) => format!("[C{c}] "),
            _ => String::new(),
        };
        let line = format!(
            "[{}][{}][{level}][{component}] [{}:{}] {conn}{}\n",
            timestamp(std::time::SystemTime::now()),
            thread_id(),
            meta.file().unwrap_or("?"),
            meta.line().unwrap_or(0),
            f.message
        );
        if let Ok(mut out) = self.out.lock() {
            let _ = out.write_all(line.as_bytes());
            let _ = out.flush();
        }
    }
}

fn thread_id() -> i64 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) }
}

/// `2026-11-25 02:35:01.216`, in UTC.
pub fn timestamp(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_envoys_format_in_utc() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_795_919_701_216);
        assert_eq!(timestamp(t), "2026-11-29 02:35:01.216");
        assert_eq!(timestamp(std::time::UNIX_EPOCH), "1970-01-01 00:00:00.000");
        let leap = std::time::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(timestamp(leap), "2000-02-29 00:00:00.000");
    }

    #[test]
    fn levels_take_envoys_names() {
        assert_eq!(level_index("warn"), level_index("warning"));
        assert_eq!(level_index("critical"), Some(5));
        assert_eq!(level_index("verbose"), None);
        assert!(set("upstream", 0));
        assert!(!set("nonsense", 0));
        assert!(levels().contains(&("upstream", "trace")));
    }
}
