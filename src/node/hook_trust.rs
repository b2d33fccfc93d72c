//! Whether a hook script may run (DESIGN.md §8, promise 6).
//!
//! Hooks run as the daemon's user — usually root — so a hook anyone else can write
//! is a way for that someone to run code as root. As cron and sshd do with their
//! files, a hook runs only when:
//!
//! - the script (after following symbolic links) is owned by root or the daemon's
//!   user, and is not writable by group or others;
//! - the directory holding it (`hooks_dir`, and the directory of a symlink's target)
//!   is owned by root or the daemon's user and is not writable by group or others.
//!
//! Otherwise the hook is refused with a reason naming it and what is wrong, and the
//! refusal is a veto like any failing hook.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// `Ok` when `path` may run as a hook; otherwise why not, naming the file.
pub fn check_trusted(path: &Path) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    check_trusted_for(path, me)
}

fn check_trusted_for(path: &Path, me: u32) -> Result<(), String> {
    let refuse = |why: String| Err(format!("hook {} refused: {why}", path.display()));
    let link = std::fs::symlink_metadata(path)
        .map_err(|e| format!("hook {} refused: cannot stat it: {e}", path.display()))?;
    if link.file_type().is_symlink() {
        if let Some(dir) = path.parent() {
            if let Err(why) = check_owner_and_mode(dir, "its directory", me) {
                return refuse(why);
            }
        }
    }
    let real = match path.canonicalize() {
        Ok(p) => p,
        Err(e) => return refuse(format!("cannot resolve it: {e}")),
    };
    if let Err(why) = check_owner_and_mode(&real, "it", me) {
        return refuse(why);
    }
    if let Some(dir) = real.parent() {
        if let Err(why) = check_owner_and_mode(dir, "its directory", me) {
            return refuse(why);
        }
    }
    Ok(())
}

fn check_owner_and_mode(p: &Path, what: &str, me: u32) -> Result<(), String> {
    let meta = std::fs::metadata(p).map_err(|e| format!("cannot stat {}: {e}", p.display()))?;
    let (uid, mode) = (meta.uid(), meta.mode() & 0o7777);
    if uid != 0 && uid != me {
        return Err(format!(
            "{what} ({}) is owned by uid {uid}, not by root or the daemon's user (uid {me})",
            p.display()
        ));
    }
    if mode & 0o022 != 0 {
        return Err(format!(
            "{what} ({}) is writable by {} (mode {mode:04o}); make it `chmod go-w`",
            p.display(),
            match (mode & 0o020 != 0, mode & 0o002 != 0) {
                (true, true) => "group and others",
                (true, false) => "its group",
                _ => "others",
            }
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// A hooks folder owned by us: (tempdir, hooks dir, script path).
    fn setup() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let d = tempfile::tempdir().expect("tempdir");
        let hooks = d.path().join("hooks.d");
        std::fs::create_dir(&hooks).expect("mkdir");
        chmod(&hooks, 0o755);
        let script = hooks.join("10-db");
        std::fs::write(&script, "#!/bin/sh\nexit 0\n").expect("write");
        chmod(&script, 0o755);
        (d, hooks, script)
    }

    fn me() -> u32 {
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() }
    }

    #[test]
    fn a_script_owned_by_the_daemon_user_and_not_writable_by_others_is_trusted() {
        let (_d, _hooks, script) = setup();
        assert_eq!(check_trusted(&script), Ok(()));
    }

    #[test]
    fn a_group_or_world_writable_script_is_refused_by_name() {
        let (_d, _hooks, script) = setup();
        for mode in [0o775, 0o757, 0o777] {
            chmod(&script, mode);
            let err = check_trusted(&script).expect_err("writable by others");
            assert!(
                err.contains("10-db")
                    && err.contains("writable")
                    && err.contains(&format!("{mode:04o}")),
                "{err}"
            );
        }
    }

    #[test]
    fn a_script_in_a_world_writable_directory_is_refused() {
        let (_d, hooks, script) = setup();
        chmod(&hooks, 0o777);
        let err = check_trusted(&script).expect_err("dir writable by others");
        assert!(
            err.contains("10-db") && err.contains("its directory") && err.contains("0777"),
            "{err}"
        );
        chmod(&hooks, 0o1777);
        assert!(
            check_trusted(&script).is_err(),
            "sticky does not make it safe"
        );
    }

    #[test]
    fn a_script_owned_by_another_user_is_refused() {
        let (_d, _hooks, script) = setup();
        let err = if me() == 0 {
            // As root: give the script to `nobody`.
            let c = std::ffi::CString::new(script.to_str().expect("utf-8")).expect("cstr");
            // SAFETY: a valid NUL-terminated path.
            assert_eq!(unsafe { libc::chown(c.as_ptr(), 65534, 65534) }, 0, "chown");
            check_trusted(&script)
        } else {
            // Not root: judge it as a daemon running as some other user would.
            check_trusted_for(&script, me().wrapping_add(4242).max(1))
        };
        let err = err.expect_err("foreign owner");
        assert!(
            err.contains("owned by uid") && err.contains("10-db"),
            "{err}"
        );
    }

    #[test]
    fn a_symlink_to_a_writable_script_elsewhere_is_refused() {
        let (d, hooks, _script) = setup();
        let elsewhere = d.path().join("tmp");
        std::fs::create_dir(&elsewhere).expect("mkdir");
        chmod(&elsewhere, 0o777);
        let target = elsewhere.join("evil");
        std::fs::write(&target, "#!/bin/sh\n").expect("write");
        chmod(&target, 0o755);
        let link = hooks.join("20-link");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let err = check_trusted(&link).expect_err("target dir is world-writable");
        assert!(
            err.contains("20-link") && err.contains("its directory"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_script_is_refused_not_a_panic() {
        let err = check_trusted(Path::new("/nonexistent/hook")).expect_err("missing");
        assert!(err.contains("/nonexistent/hook"), "{err}");
    }
}
