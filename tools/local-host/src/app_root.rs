//! Reads a Functions app root the way the host does at start-up: `host.json` for the custom
//! handler's executable and `functionTimeout`, every `<folder>/function.json` for a function
//! (named after its folder) and its trigger binding.
//!
//! The host binds configuration case-insensitively, so keys are looked up that way here too.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

/// App settings as the handler sees them: the environment, plus `local.settings.json` values
/// that the environment does not already set (Core Tools gives the environment precedence).
#[derive(Debug, Clone, Default)]
pub struct Settings {
    values: HashMap<String, String>,
    /// Only what came from the settings file: the child inherits the environment anyway.
    from_file: Vec<(String, String)>,
}

impl Settings {
    pub fn from_env() -> Self {
        Self {
            values: std::env::vars().collect(),
            from_file: Vec::new(),
        }
    }

    /// Adds `Values` of a `local.settings.json`, without overriding what is already set.
    pub fn load_file(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read settings file {}", path.display()))?;
        let json: Value = serde_json::from_str(&text)
            .with_context(|| format!("settings file {} is not JSON", path.display()))?;
        let Some(values) = get_ci(&json, "Values").and_then(Value::as_object) else {
            bail!("settings file {} has no \"Values\" object", path.display());
        };
        for (key, value) in values {
            let value = match value {
                Value::String(s) => s.clone(),
                Value::Null => continue,
                other => other.to_string(),
            };
            if !self.values.contains_key(key) {
                self.values.insert(key.clone(), value.clone());
                self.from_file.push((key.clone(), value));
            }
        }
        Ok(())
    }

    #[cfg(test)]
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Self {
        Self {
            values: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            from_file: Vec::new(),
        }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// Settings the child process must be given explicitly (it inherits the rest).
    pub fn file_values(&self) -> &[(String, String)] {
        &self.from_file
    }

    /// Resolves `%NAME%` references, as the host does for schedules and handler arguments.
    /// An unknown name is an error: the host refuses to index such a function.
    pub fn expand(&self, text: &str) -> Result<String> {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find('%') {
            out.push_str(&rest[..start]);
            let after = &rest[start + 1..];
            let Some(end) = after.find('%') else {
                bail!("`{text}` has an unmatched `%`");
            };
            let name = &after[..end];
            if name.is_empty() {
                bail!("`{text}` has an empty `%%` reference");
            }
            let value = self.get(name).ok_or_else(|| {
                anyhow!("`%{name}%` does not resolve: app setting {name} is not set")
            })?;
            out.push_str(value);
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

#[derive(Debug, Clone)]
pub struct AppRoot {
    pub root: PathBuf,
    pub handler: HandlerDescription,
    /// How long the host waits for one invocation; also its HTTP timeout to the handler.
    pub function_timeout: Duration,
    pub functions: Vec<Function>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerDescription {
    /// A path when the file exists under the app root, else a command looked up on PATH.
    pub executable: PathBuf,
    pub arguments: Vec<String>,
    pub working_directory: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Function {
    pub name: String,
    pub trigger: Trigger,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    EventGrid {
        binding: String,
    },
    Timer {
        binding: String,
        /// With `%SETTING%` already resolved.
        schedule: String,
        run_on_startup: bool,
        /// `None`: not set, so the host decides from the schedule's interval.
        use_monitor: Option<bool>,
    },
    /// Any other trigger type: listed at start-up, never invoked.
    Other {
        binding: String,
        kind: String,
    },
}

/// The Flex Consumption default when `host.json` sets no `functionTimeout`.
const DEFAULT_FUNCTION_TIMEOUT: Duration = Duration::from_secs(30 * 60);

impl AppRoot {
    pub fn load(root: &Path, settings: &Settings) -> Result<Self> {
        let host_path = root.join("host.json");
        let text = std::fs::read_to_string(&host_path).with_context(|| {
            format!(
                "cannot read {} (is --app-root the folder with host.json?)",
                host_path.display()
            )
        })?;
        let host: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", host_path.display()))?;
        let handler = handler_description(root, &host, settings)
            .with_context(|| format!("in {}", host_path.display()))?;
        let function_timeout = match get_ci(&host, "functionTimeout").and_then(Value::as_str) {
            None => DEFAULT_FUNCTION_TIMEOUT,
            Some(t) => parse_timespan(t).with_context(|| {
                format!(
                    "{}: functionTimeout `{t}` is not hh:mm:ss",
                    host_path.display()
                )
            })?,
        };

        let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
            .with_context(|| format!("cannot list {}", root.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("function.json").is_file())
            .collect();
        dirs.sort();
        let mut functions = Vec::new();
        for dir in dirs {
            let name = dir
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| anyhow!("function folder {} is not UTF-8", dir.display()))?
                .to_string();
            let path = dir.join("function.json");
            let json: Value = serde_json::from_str(
                &std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?,
            )
            .with_context(|| format!("{} is not JSON", path.display()))?;
            if is_disabled(&name, &json, settings) {
                continue;
            }
            let trigger =
                trigger_of(&json, settings).with_context(|| format!("in {}", path.display()))?;
            functions.push(Function { name, trigger });
        }
        if functions.is_empty() {
            bail!(
                "no function folders (*/function.json) in {}",
                root.display()
            );
        }
        Ok(Self {
            root: root.to_path_buf(),
            handler,
            function_timeout,
            functions,
        })
    }
}

fn handler_description(
    root: &Path,
    host: &Value,
    settings: &Settings,
) -> Result<HandlerDescription> {
    let description = get_ci(host, "customHandler")
        .and_then(|c| get_ci(c, "description"))
        .ok_or_else(|| anyhow!("no customHandler.description: not a custom handler app"))?;
    let exe = get_ci(description, "defaultExecutablePath")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| anyhow!("customHandler.description.defaultExecutablePath is not set"))?;
    let working_directory = match get_ci(description, "workingDirectory").and_then(Value::as_str) {
        None | Some("") => root.to_path_buf(),
        Some(wd) => root.join(wd),
    };
    let arguments = match get_ci(description, "arguments") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|a| {
                let a = a.as_str().ok_or_else(|| {
                    anyhow!("customHandler.description.arguments holds a non-string")
                })?;
                settings.expand(a)
            })
            .collect::<Result<_>>()?,
        Some(_) => bail!("customHandler.description.arguments is not an array"),
    };
    Ok(HandlerDescription {
        executable: resolve_executable(exe, &working_directory, root),
        arguments,
        working_directory,
    })
}

/// The host looks for the file under the working directory, then the app root; a name found in
/// neither is run as a command from PATH.
fn resolve_executable(exe: &str, working_directory: &Path, root: &Path) -> PathBuf {
    let path = Path::new(exe);
    if path.is_absolute() {
        return path.to_path_buf();
    }
    [working_directory.join(path), root.join(path)]
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| path.to_path_buf())
}

/// `"disabled": true` in function.json, or the app setting `AzureWebJobs.<name>.Disabled`.
fn is_disabled(name: &str, json: &Value, settings: &Settings) -> bool {
    let truthy = |s: &str| s.eq_ignore_ascii_case("true") || s == "1";
    let in_json = match get_ci(json, "disabled") {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(setting)) => settings.get(setting).is_some_and(truthy),
        _ => false,
    };
    in_json
        || settings
            .get(&format!("AzureWebJobs.{name}.Disabled"))
            .is_some_and(truthy)
}

fn trigger_of(json: &Value, settings: &Settings) -> Result<Trigger> {
    let bindings = get_ci(json, "bindings")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("no \"bindings\" array"))?;
    let mut triggers = bindings.iter().filter(|b| {
        get_ci(b, "type")
            .and_then(Value::as_str)
            .is_some_and(|t| t.to_ascii_lowercase().ends_with("trigger"))
    });
    let binding = triggers
        .next()
        .ok_or_else(|| anyhow!("no trigger binding"))?;
    if triggers.next().is_some() {
        bail!("more than one trigger binding");
    }
    let kind = get_ci(binding, "type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let name = get_ci(binding, "name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| anyhow!("the {kind} binding has no name"))?
        .to_string();
    Ok(match kind.to_ascii_lowercase().as_str() {
        "eventgridtrigger" => Trigger::EventGrid { binding: name },
        "timertrigger" => {
            let raw = get_ci(binding, "schedule")
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("the timerTrigger binding has no schedule"))?;
            Trigger::Timer {
                binding: name,
                schedule: settings.expand(raw).context("timer schedule")?,
                run_on_startup: get_ci(binding, "runOnStartup")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                use_monitor: get_ci(binding, "useMonitor").and_then(Value::as_bool),
            }
        }
        _ => Trigger::Other {
            binding: name,
            kind: kind.to_string(),
        },
    })
}

/// .NET TimeSpan text as host.json uses it: `hh:mm:ss` or `d.hh:mm:ss`; `-1` means unbounded.
pub fn parse_timespan(text: &str) -> Result<Duration> {
    let text = text.trim();
    if text == "-1" {
        return Ok(Duration::from_secs(u64::from(u32::MAX)));
    }
    let (days, hms) = match text.split_once('.') {
        Some((d, rest)) if rest.contains(':') && !d.contains(':') => (d.parse::<u64>()?, rest),
        _ => (0, text),
    };
    let parts: Vec<&str> = hms.split(':').collect();
    let [h, m, s] = parts[..] else {
        bail!("expected hh:mm:ss");
    };
    let secs: f64 = s.parse()?;
    if !(0.0..60.0).contains(&secs) {
        bail!("seconds out of range");
    }
    let total = days * 86_400 + h.parse::<u64>()? * 3600 + m.parse::<u64>()? * 60;
    Ok(Duration::from_secs(total) + Duration::from_secs_f64(secs))
}

/// Object member lookup ignoring case, as .NET configuration binding does.
fn get_ci<'a>(value: &'a Value, key: &str) -> Option<&'a Value> {
    let object = value.as_object()?;
    object.get(key).or_else(|| {
        object
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    #[test]
    fn reads_the_repository_app_root() {
        let settings = Settings::from_pairs(&[("BATCH_TIMER_SCHEDULE", "0 */5 * * * *")]);
        let app = AppRoot::load(&repo_root(), &settings).unwrap();
        assert_eq!(app.function_timeout, Duration::from_secs(600));
        assert!(app.handler.arguments.is_empty());
        assert_eq!(app.handler.working_directory, repo_root());
        // `handler` is built into target/, not the app root, until it is published.
        let exe = &app.handler.executable;
        assert!(exe == Path::new("handler") || exe == &repo_root().join("handler"));
        assert_eq!(
            app.functions,
            vec![
                Function {
                    name: "function-timer".into(),
                    trigger: Trigger::Timer {
                        binding: "timer".into(),
                        schedule: "0 */5 * * * *".into(),
                        run_on_startup: false,
                        use_monitor: Some(true),
                    },
                },
                Function {
                    name: "function-trigger".into(),
                    trigger: Trigger::EventGrid {
                        binding: "event".into()
                    },
                },
                Function {
                    name: "function-webhook".into(),
                    trigger: Trigger::Other {
                        binding: "req".into(),
                        kind: "httpTrigger".into()
                    },
                },
            ]
        );
    }

    #[test]
    fn an_unset_schedule_setting_is_named() {
        let err = AppRoot::load(&repo_root(), &Settings::default()).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("function-timer"), "{text}");
        assert!(text.contains("BATCH_TIMER_SCHEDULE"), "{text}");
    }

    fn write(dir: &Path, rel: &str, text: &str) {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn handler_path_arguments_and_disabled_functions() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "host.json",
            r#"{"version":"2.0","CustomHandler":{"Description":{"defaultExecutablePath":"app/run.sh","workingDirectory":"app","arguments":["--port-from","%MODE%"]}}}"#,
        );
        write(dir.path(), "app/app/run.sh", "#!/bin/sh\n");
        write(
            dir.path(),
            "t/function.json",
            r#"{"bindings":[{"name":"tick","type":"TimerTrigger","direction":"in","schedule":"*/10 * * * * *","runOnStartup":true}]}"#,
        );
        write(
            dir.path(),
            "off/function.json",
            r#"{"disabled":true,"bindings":[{"name":"e","type":"eventGridTrigger"}]}"#,
        );
        write(
            dir.path(),
            "off2/function.json",
            r#"{"bindings":[{"name":"e","type":"eventGridTrigger"}]}"#,
        );
        write(
            dir.path(),
            "q/function.json",
            r#"{"bindings":[{"name":"msg","type":"queueTrigger"},{"name":"out","type":"blob","direction":"out"}]}"#,
        );
        write(dir.path(), "not-a-function/readme.txt", "");
        let settings =
            Settings::from_pairs(&[("MODE", "fast"), ("AzureWebJobs.off2.Disabled", "true")]);
        let app = AppRoot::load(dir.path(), &settings).unwrap();
        assert_eq!(app.function_timeout, DEFAULT_FUNCTION_TIMEOUT);
        assert_eq!(app.handler.executable, dir.path().join("app/app/run.sh"));
        assert_eq!(app.handler.working_directory, dir.path().join("app"));
        assert_eq!(app.handler.arguments, ["--port-from", "fast"]);
        let names: Vec<_> = app.functions.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["q", "t"]);
        assert_eq!(
            app.functions[0].trigger,
            Trigger::Other {
                binding: "msg".into(),
                kind: "queueTrigger".into()
            }
        );
        assert_eq!(
            app.functions[1].trigger,
            Trigger::Timer {
                binding: "tick".into(),
                schedule: "*/10 * * * * *".into(),
                run_on_startup: true,
                use_monitor: None
            }
        );
    }

    #[test]
    fn settings_expansion() {
        let s = Settings::from_pairs(&[("A", "1"), ("B", "x y")]);
        assert_eq!(s.expand("plain").unwrap(), "plain");
        assert_eq!(s.expand("%A%").unwrap(), "1");
        assert_eq!(s.expand("a%A%b%B%c").unwrap(), "a1bx yc");
        assert!(
            s.expand("%C%")
                .unwrap_err()
                .to_string()
                .contains("C is not set")
        );
        assert!(s.expand("%A").is_err());
        assert!(s.expand("%%").is_err());
    }

    #[test]
    fn settings_file_does_not_override_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("local.settings.json");
        std::fs::write(
            &path,
            r#"{"IsEncrypted":false,"Values":{"A":"from-file","B":"from-file","N":5,"Z":null}}"#,
        )
        .unwrap();
        let mut s = Settings::from_pairs(&[("A", "from-env")]);
        s.load_file(&path).unwrap();
        assert_eq!(s.get("A"), Some("from-env"));
        assert_eq!(s.get("B"), Some("from-file"));
        assert_eq!(s.get("N"), Some("5"));
        assert_eq!(s.get("Z"), None);
        let mut given: Vec<_> = s.file_values().to_vec();
        given.sort();
        assert_eq!(
            given,
            [("B".into(), "from-file".into()), ("N".into(), "5".into())]
        );
    }

    #[test]
    fn timespans() {
        assert_eq!(
            parse_timespan("00:10:00").unwrap(),
            Duration::from_secs(600)
        );
        assert_eq!(
            parse_timespan("1.02:00:30").unwrap(),
            Duration::from_secs(93_630)
        );
        assert_eq!(
            parse_timespan("00:00:01.5").unwrap(),
            Duration::from_millis(1500)
        );
        assert!(parse_timespan("-1").unwrap() > Duration::from_secs(86_400 * 365));
        assert!(parse_timespan("10").is_err());
        assert!(parse_timespan("00:00:60").is_err());
    }
}
