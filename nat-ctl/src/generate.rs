//! `nat-ctl generate DIR`: the manual pages and shell completions, made from the command-line
//! definition itself so they never disagree with `--help`. Packagers run it at build time.

use std::{fs, path::Path};

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;

/// Section of the manual for system administration commands (man-pages(7)).
const MAN_SECTION: &str = "8";
/// The shells whose completions are written, and the file name each expects (bash-completion,
/// zsh's `_name` convention, fish's `name.fish`).
const SHELLS: [(Shell, &str); 3] = [
    (Shell::Bash, "nat-ctl"),
    (Shell::Zsh, "_nat-ctl"),
    (Shell::Fish, "nat-ctl.fish"),
];

/// Writes `man8/nat-ctl.8`, one `man8/nat-ctl-SUB.8` per visible subcommand, and
/// `completions/{bash,zsh,fish}/...` under `dir`.
pub fn write_all(dir: &Path) -> Result<()> {
    let man_dir = dir.join(format!("man{MAN_SECTION}"));
    fs::create_dir_all(&man_dir).with_context(|| format!("cannot create {}", man_dir.display()))?;
    let command = Cli::command();
    write_man(&man_dir, "nat-ctl", command.clone())?;
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("nat-ctl-{}", sub.get_name());
        write_man(&man_dir, &name, sub.clone().name(name.clone()))?;
    }
    for (shell, file) in SHELLS {
        let shell_dir = dir.join("completions").join(shell.to_string());
        fs::create_dir_all(&shell_dir).with_context(|| format!("cannot create {}", shell_dir.display()))?;
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "nat-ctl", &mut out);
        let path = shell_dir.join(file);
        fs::write(&path, out).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn write_man(dir: &Path, name: &str, command: clap::Command) -> Result<()> {
    let mut page = Vec::new();
    clap_mangen::Man::new(command.version(crate::cli::VERSION))
        .section(MAN_SECTION)
        .render(&mut page)?;
    let path = dir.join(format!("{name}.{MAN_SECTION}"));
    fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_completions_name_every_visible_subcommand() {
        let dir = std::env::temp_dir().join(format!("nat-ctl-generate-{}", std::process::id()));
        write_all(&dir).unwrap();
        let page = fs::read_to_string(dir.join("man8/nat-ctl.8")).unwrap();
        assert!(page.contains(".TH nat-ctl 8"), "{page}");
        let attach = fs::read_to_string(dir.join("man8/nat-ctl-attach.8")).unwrap();
        assert!(attach.contains("\\-\\-mode"), "{attach}");
        assert!(!dir.join("man8/nat-ctl-generate.8").exists());
        let bash = fs::read_to_string(dir.join("completions/bash/nat-ctl")).unwrap();
        for sub in ["attach", "mappings", "status", "detach"] {
            assert!(bash.contains(sub), "bash completion lacks {sub}");
        }
        assert!(dir.join("completions/zsh/_nat-ctl").is_file());
        assert!(dir.join("completions/fish/nat-ctl.fish").is_file());
        fs::remove_dir_all(&dir).unwrap();
    }
}
