//! The console on the recorded 3-node demo cluster, without the `freezeframe`
//! binary or a node: `cargo run -p freezeframe-gui --example demo`.
//! (Used for `assets/console.png`; `FREEZEFRAME_CONSOLE_DEMO=1 freezeframe
//! console` does the same from the real binary.)

fn main() -> std::process::ExitCode {
    match freezeframe_gui::run_demo() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
