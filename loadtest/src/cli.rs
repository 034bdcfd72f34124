//! Command-line flags as `--name value` pairs (and bare `--switch`es), read by name with errors
//! that name the flag. Deliberately tiny: the binary has a handful of flags per scenario.

use std::collections::BTreeMap;
use std::str::FromStr;

use anyhow::{Context, bail};

pub struct Args {
    values: BTreeMap<String, Vec<String>>,
    used: std::cell::RefCell<std::collections::BTreeSet<String>>,
}

impl Args {
    /// Parse `args`; names in `switches` take no value.
    pub fn parse(args: &[String], switches: &[&str]) -> anyhow::Result<Args> {
        let mut values: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let Some(name) = a.strip_prefix("--") else {
                bail!("unexpected argument `{a}` (flags are --name value)");
            };
            let (name, inline) = match name.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (name, None),
            };
            let value = if switches.contains(&name) {
                inline.unwrap_or_else(|| "true".to_string())
            } else {
                match inline {
                    Some(v) => v,
                    None => it
                        .next()
                        .with_context(|| format!("--{name} needs a value"))?
                        .clone(),
                }
            };
            values.entry(name.to_string()).or_default().push(value);
        }
        Ok(Args {
            values,
            used: Default::default(),
        })
    }

    pub fn get<T: FromStr>(&self, name: &str, default: T) -> anyhow::Result<T>
    where
        T::Err: std::fmt::Display,
    {
        Ok(self.opt(name)?.unwrap_or(default))
    }

    pub fn opt<T: FromStr>(&self, name: &str) -> anyhow::Result<Option<T>>
    where
        T::Err: std::fmt::Display,
    {
        self.used.borrow_mut().insert(name.to_string());
        match self.values.get(name).and_then(|v| v.last()) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|e| anyhow::anyhow!("--{name} {v}: {e}")),
        }
    }

    pub fn all(&self, name: &str) -> Vec<String> {
        self.used.borrow_mut().insert(name.to_string());
        self.values.get(name).cloned().unwrap_or_default()
    }

    pub fn flag(&self, name: &str) -> bool {
        self.used.borrow_mut().insert(name.to_string());
        self.values
            .get(name)
            .and_then(|v| v.last())
            .is_some_and(|v| v != "false")
    }

    /// Fail on flags nobody asked for: a typo must not silently run the default.
    pub fn finish(&self) -> anyhow::Result<()> {
        let used = self.used.borrow();
        let unknown: Vec<&String> = self.values.keys().filter(|k| !used.contains(*k)).collect();
        if !unknown.is_empty() {
            let names: Vec<String> = unknown.iter().map(|k| format!("--{k}")).collect();
            bail!("unknown flag(s) for this scenario: {}", names.join(" "));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn flags() {
        let a = Args::parse(
            &s(&["--c", "5", "--quiet", "--h=x", "--h", "y"]),
            &["quiet"],
        )
        .unwrap();
        assert_eq!(a.get("c", 1usize).unwrap(), 5);
        assert_eq!(a.get("d", 7usize).unwrap(), 7);
        assert!(a.flag("quiet"));
        assert_eq!(a.all("h"), vec!["x", "y"]);
        a.finish().unwrap();
        let a = Args::parse(&s(&["--c", "x", "--typo", "1"]), &[]).unwrap();
        assert!(a.get("c", 1usize).is_err());
        assert!(a.finish().is_err());
        assert!(Args::parse(&s(&["--c"]), &[]).is_err());
        assert!(Args::parse(&s(&["c"]), &[]).is_err());
    }
}
