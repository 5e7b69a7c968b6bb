//! The figures of one run: the table on stdout and `results.json`.

use serde::Serialize;
use serde_json::{Value, json};

use crate::Scale;

/// A goal a figure is held to.
#[derive(Debug, Clone, Copy, Serialize)]
pub enum Goal {
    #[serde(rename = ">=")]
    AtLeast(f64),
    #[serde(rename = "<=")]
    AtMost(f64),
}

impl Goal {
    fn met(self, value: f64) -> bool {
        match self {
            Goal::AtLeast(goal) => value >= goal,
            Goal::AtMost(goal) => value <= goal,
        }
    }

    fn describe(self) -> String {
        match self {
            Goal::AtLeast(goal) => format!(">= {goal}"),
            Goal::AtMost(goal) => format!("<= {goal}"),
        }
    }
}

/// What a figure was measured against, with its absolute value.
#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    pub what: String,
    pub value: f64,
    pub unit: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub key: &'static str,
    pub value: f64,
    pub unit: &'static str,
    pub goal: Option<Goal>,
    pub met: Option<bool>,
    pub baseline: Option<Baseline>,
    /// The absolute figures behind the value, for the record.
    pub detail: Value,
}

pub struct Report {
    pub mode: &'static str,
    scale: Value,
    started: chrono::DateTime<chrono::Utc>,
    pub figures: Vec<Figure>,
    pub failures: Vec<(String, String)>,
}

impl Report {
    pub fn new(mode: &'static str, scale: &Scale) -> Self {
        Self {
            mode,
            scale: serde_json::to_value(scale).unwrap_or(Value::Null),
            started: chrono::Utc::now(),
            figures: Vec::new(),
            failures: Vec::new(),
        }
    }

    /// Records a figure and prints it as it is taken.
    pub fn add(
        &mut self,
        key: &'static str,
        value: f64,
        unit: &'static str,
        goal: Option<Goal>,
        baseline: Option<Baseline>,
        detail: Value,
    ) {
        let figure = Figure {
            key,
            value,
            unit,
            goal,
            met: goal.map(|g| g.met(value)),
            baseline,
            detail,
        };
        println!("   {}", line(&figure));
        self.figures.push(figure);
    }

    pub fn failed(&mut self, measurement: &str, why: String) {
        self.failures.push((measurement.to_string(), why));
    }

    pub fn print(&self) {
        println!();
        println!(
            "| {:<36} | {:>12} | {:<8} | {:<4} | baseline (same run)",
            "key", "value", "goal", "met"
        );
        println!(
            "|{:-<38}|{:->14}|{:-<10}|{:-<6}|{:-<40}",
            "", "", "", "", ""
        );
        for [key, value, goal, met, baseline] in self.rows() {
            println!("| {key:<36} | {value:>12} | {goal:<8} | {met:<4} | {baseline}");
        }
        for (name, why) in &self.failures {
            println!("| {name}: FAILED: {why}");
        }
    }

    /// The table as Markdown, for BENCHMARKS.md.
    pub fn to_markdown(&self) -> String {
        let mut text = String::from(
            "| key | value | goal | met | baseline (same run) |\n| --- | ---: | --- | --- | --- |\n",
        );
        for [key, value, goal, met, baseline] in self.rows() {
            let met = if met == "NO" { "**no**" } else { &met };
            text.push_str(&format!(
                "| `{key}` | {value} | {goal} | {met} | {baseline} |\n"
            ));
        }
        for (name, why) in &self.failures {
            text.push_str(&format!("| `{name}` | failed: {why} | | | |\n"));
        }
        text
    }

    /// Each figure's cells: key, value, goal, met, baseline.
    fn rows(&self) -> impl Iterator<Item = [String; 5]> + '_ {
        self.figures.iter().map(|f| {
            [
                f.key.to_string(),
                format_value(f.value, f.unit),
                f.goal.map(Goal::describe).unwrap_or_else(|| "-".into()),
                match f.met {
                    Some(true) => "yes",
                    Some(false) => "NO",
                    None => "-",
                }
                .to_string(),
                f.baseline
                    .as_ref()
                    .map(|b| format!("{}: {}", b.what, format_value(b.value, b.unit)))
                    .unwrap_or_default(),
            ]
        })
    }

    pub fn to_json(&self) -> anyhow::Result<String> {
        let figures: serde_json::Map<String, Value> = self
            .figures
            .iter()
            .map(|f| Ok((f.key.to_string(), serde_json::to_value(f)?)))
            .collect::<Result<_, serde_json::Error>>()?;
        let document = json!({
            "mode": self.mode,
            "started_at": self.started.to_rfc3339(),
            "finished_at": chrono::Utc::now().to_rfc3339(),
            "machine": machine(),
            "scale": self.scale,
            "figures": figures,
            "failures": self.failures.iter().map(|(m, w)| json!({"measurement": m, "error": w})).collect::<Vec<_>>(),
        });
        Ok(serde_json::to_string_pretty(&document)?)
    }
}

fn line(f: &Figure) -> String {
    let mut text = format!("{} = {}", f.key, format_value(f.value, f.unit));
    if let Some(goal) = f.goal {
        text.push_str(&format!(
            " (goal {}: {})",
            goal.describe(),
            if goal.met(f.value) { "met" } else { "NOT met" }
        ));
    }
    if let Some(b) = &f.baseline {
        text.push_str(&format!("; {} = {}", b.what, format_value(b.value, b.unit)));
    }
    text
}

fn format_value(value: f64, unit: &str) -> String {
    let number = if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    };
    if unit.is_empty() {
        number
    } else {
        format!("{number} {unit}")
    }
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let memory_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "memory_bytes": memory_kb * 1024,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default(),
    })
}
