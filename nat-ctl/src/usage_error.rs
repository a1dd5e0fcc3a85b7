//! How a command-line mistake is reported: clap's own text (its "a similar argument exists"
//! tips, the missing arguments, the usage line), prefixed with the program's name, without the
//! generic "For more information, try '--help'" footer. A wrong value keeps to one line, as
//! clap writes it.

/// The text to print on stderr for clap's rendered error `rendered` (plain, no colours).
pub fn report(rendered: &str) -> String {
    let mut lines: Vec<&str> = rendered
        .lines()
        .filter(|line| !line.starts_with("For more information"))
        .collect();
    while lines.last().is_some_and(|l| l.trim().is_empty()) {
        lines.pop();
    }
    let mut text = String::from("nat-ctl: ");
    text.push_str(&lines.join("\n"));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typo_keeps_clap_s_suggestion_and_usage() {
        let clap = "error: unexpected argument '--mdoe' found\n\n  tip: a similar argument exists: '--mode'\n\nUsage: nat-ctl attach --mode <MODE> <IFACE>\n\nFor more information, try '--help'.\n";
        let text = report(clap);
        assert!(text.starts_with("nat-ctl: error: unexpected argument '--mdoe' found"));
        assert!(text.contains("tip: a similar argument exists: '--mode'"));
        assert!(text.contains("Usage: nat-ctl attach"));
        assert!(!text.contains("For more information"));
    }

    #[test]
    fn a_wrong_value_stays_one_line() {
        let clap = "error: invalid value 'foo' for '--external-addr <ADDR>': not an IPv4 address\n\nFor more information, try '--help'.\n";
        assert_eq!(
            report(clap),
            "nat-ctl: error: invalid value 'foo' for '--external-addr <ADDR>': not an IPv4 address"
        );
    }
}
