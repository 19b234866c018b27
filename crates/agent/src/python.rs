//! Zero-code support for Python ranks. The agent carries the repository's `python/` package (the
//! `myriad` module and its `sitecustomize`) inside its binary and writes it into its work
//! directory at start; every rank then gets that directory first on PYTHONPATH, so Python runs
//! the sitecustomize before the script and every `optimizer.step()` of an unmodified PyTorch
//! script reports progress. The package on the path is the agent's own: it always speaks this
//! agent's protocol, whatever version a user pip-installed. A job opts out with
//! MYRIAD_PYTHON_HOOK=0 in its env. The sitecustomize also arms a Python stack dump on SIGUSR2
//! into MYRIAD_STACK_FILE, which the hang detector reads before it kills a hung rank.

use proto::env::{MYRIAD_PYTHON_HOOK, MYRIAD_STACK_FILE, PYTHONPATH};
use std::path::{Path, PathBuf};

/// The package as the agent writes it: path under the directory, contents.
const FILES: &[(&str, &str)] = &[
    ("sitecustomize.py", include_str!("../../../python/myriad/_site/sitecustomize.py")),
    ("myriad/__init__.py", include_str!("../../../python/myriad/__init__.py")),
    ("myriad/_agent.py", include_str!("../../../python/myriad/_agent.py")),
    ("myriad/_hook.py", include_str!("../../../python/myriad/_hook.py")),
    ("myriad/checkpoint.py", include_str!("../../../python/myriad/checkpoint.py")),
];

/// Writes the package under `work_dir/python` (replacing what an older agent left) and returns
/// that directory.
pub(crate) fn install(work_dir: &Path) -> Result<PathBuf, String> {
    let dir = work_dir.join("python");
    let _ = std::fs::remove_dir_all(&dir);
    for (name, text) in FILES {
        let path = dir.join(name);
        let parent = path.parent().expect("a file under the directory");
        std::fs::create_dir_all(parent)
            .and_then(|_| std::fs::write(&path, text))
            .map_err(|e| format!("writing the Python package to {}: {e}", path.display()))?;
    }
    Ok(dir)
}

/// What a rank's environment gains: the package first on PYTHONPATH (before the job's own
/// PYTHONPATH, else the agent's) unless the job opted out, and where its stack dump goes.
pub(crate) fn rank_env(
    package: &Path,
    job_env: &[(String, String)],
    inherited_path: Option<String>,
    stack_file: &Path,
) -> Vec<(String, String)> {
    let get = |name: &str| job_env.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let mut env = vec![(MYRIAD_STACK_FILE.to_string(), stack_file.display().to_string())];
    if get(MYRIAD_PYTHON_HOOK).is_some_and(|v| v.trim() == "0") {
        return env;
    }
    let rest = get(PYTHONPATH).or(inherited_path).filter(|p| !p.is_empty());
    let path = match rest {
        Some(rest) => format!("{}:{rest}", package.display()),
        None => package.display().to_string(),
    };
    env.push((PYTHONPATH.to_string(), path));
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_package_goes_first_on_the_path_unless_the_job_opts_out() {
        let package = Path::new("/agent/python");
        let stack = Path::new("/agent/jobs/1/attempt-0/rank-0.pystack");
        let get =
            |env: &[(String, String)], k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let vars = rank_env(package, &[], None, stack);
        assert_eq!(get(&vars, PYTHONPATH).as_deref(), Some("/agent/python"));
        assert_eq!(get(&vars, MYRIAD_STACK_FILE).as_deref(), Some(stack.to_str().unwrap()));
        let vars = rank_env(package, &[], Some("/site".into()), stack);
        assert_eq!(get(&vars, PYTHONPATH).as_deref(), Some("/agent/python:/site"));
        let job = env(&[(PYTHONPATH, "/job/lib")]);
        let vars = rank_env(package, &job, Some("/site".into()), stack);
        assert_eq!(get(&vars, PYTHONPATH).as_deref(), Some("/agent/python:/job/lib"), "the job's path wins");
        let off = env(&[(MYRIAD_PYTHON_HOOK, "0")]);
        assert_eq!(get(&rank_env(package, &off, Some("/site".into()), stack), PYTHONPATH), None);
    }

    #[test]
    fn the_package_is_written_whole() {
        let dir = std::env::temp_dir().join(format!("myriad-agent-python-{}", std::process::id()));
        let package = install(&dir).unwrap();
        for (name, text) in FILES {
            assert_eq!(&std::fs::read_to_string(package.join(name)).unwrap(), text);
        }
        install(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
