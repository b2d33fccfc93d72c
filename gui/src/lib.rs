//! # freezeframe-gui
//!
//! The desktop console (`freezeframe console`): one window connected to one
//! node's control socket, showing every node's connection, writers and phase
//! live, the running or last snapshot on a shared timeline, the snapshots with
//! their actions, and the freeze-window history.
//!
//! # Layout
//! - [`wire`]: the JSON shapes of `docs/protocol.md`, read leniently.
//! - [`model`]: the cluster view built from status, events and reports (pure).
//! - [`palette`]: phase colours (Okabe–Ito), letters and words.
//! - [`panels`]: drawing functions that return [`panels::Command`]s.
//! - [`app`]: [`ConsoleApp`]; the one place commands are applied.
//! - [`backend`]: the I/O thread (control socket, events, child processes).
//! - [`jobs`]: verify and backup as child processes with progress and cancel.
//! - [`demo`]: a recorded 3-node snapshot and a backend that replays it.
//! - [`format`]: sizes, durations and UTC times for people.
//!
//! # Driving it without a window
//! `BackendHandle::fake()` returns the UI's handle and a [`FakeBackend`];
//! `ConsoleApp::new(handle, "n1")` takes the handle, the test pushes
//! [`model::Update`]s into the fake end and reads the [`Request`]s the UI made,
//! and `app.show(ui)` (which calls `app.poll()`) draws one frame, for example
//! inside an `egui_kittest::Harness`. Against a real node, use
//! `BackendHandle::spawn(BackendConfig { control_socket, .. })` instead and
//! let the state arrive before querying a frame:
//!
//! ```text
//! let handle = BackendHandle::spawn(BackendConfig { control_socket, node: "n1".into(),
//!     freezeframe_exe, snapshot_timeout_ms: 30_000 })?;
//! let mut h = Harness::builder().with_size([1280.0, 800.0])
//!     .build_ui_state(|ui, app: &mut ConsoleApp| app.show(ui), ConsoleApp::new(handle, "n1"));
//! h.state_mut().wait_for(Duration::from_secs(10), |m| m.nodes.len() == 3);
//! h.run_steps(4);
//! h.get_by_label("Take snapshot").click();
//! h.run_steps(4);
//! h.state_mut().wait_for(Duration::from_secs(30), |m| !m.creating);
//! h.run_steps(4);
//! h.get_by_label("n1: done"); // and n2, n3; a failure: get_by_label_contains("failed on node n3")
//! ```

// Tests may unwrap: a panic there is a failed test with its message.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod app;
pub mod backend;
pub mod demo;
mod error;
pub mod format;
pub mod jobs;
pub mod model;
pub mod palette;
pub mod panels;
pub mod wire;

use std::path::PathBuf;
use std::time::Duration;

pub use app::{ConsoleApp, Settings};
pub use backend::{BackendConfig, BackendHandle, FakeBackend, Request};
pub use error::{Error, Result};

/// The window's default size in points.
pub const DEFAULT_SIZE: [f32; 2] = [1280.0, 800.0];

/// The app icon (drawn by `gui/tools/make_icon.py`).
const ICON_PNG: &[u8] = include_bytes!("../../assets/icon.png");

/// Set to `1` to run the window on the recorded demo cluster instead of a node.
pub const DEMO_ENV: &str = "FREEZEFRAME_CONSOLE_DEMO";

/// Opens the console window on `control_socket` (the node called `node`) and
/// returns when the window is closed. `freezeframe_exe` runs verify and backup.
/// With `FREEZEFRAME_CONSOLE_DEMO=1` in the environment it opens on the
/// recorded demo cluster instead ([`run_demo`]).
pub fn run(control_socket: PathBuf, node: String, freezeframe_exe: PathBuf) -> Result<()> {
    if std::env::var(DEMO_ENV).is_ok_and(|v| v == "1") {
        return run_demo();
    }
    let backend = BackendHandle::spawn(BackendConfig {
        control_socket,
        node: node.clone(),
        freezeframe_exe,
        snapshot_timeout_ms: 60_000,
    })?;
    open_window(ConsoleApp::new(backend, node))
}

/// Opens the console on the recorded 3-node demo cluster: a snapshot every
/// few seconds (three times slower than recorded, so people can follow it).
pub fn run_demo() -> Result<()> {
    let (handle, fake) = BackendHandle::fake();
    std::thread::Builder::new()
        .name("console-demo".into())
        .spawn(move || demo::run(fake, 3, Duration::from_secs(6)))
        .map_err(Error::Runtime)?;
    open_window(ConsoleApp::new(handle, "n1"))
}

fn open_window(mut app: ConsoleApp) -> Result<()> {
    if let Some(path) = Settings::default_path() {
        app = app.with_settings_file(path);
    }
    let mut viewport = egui::ViewportBuilder::default()
        .with_title("freezeframe console")
        .with_app_id("freezeframe-console")
        .with_inner_size(DEFAULT_SIZE)
        .with_min_inner_size([800.0, 500.0]);
    match eframe::icon_data::from_png_bytes(ICON_PNG) {
        Ok(icon) => viewport = viewport.with_icon(icon),
        Err(e) => tracing::warn!("the built-in icon does not decode: {e}"),
    }
    let options = eframe::NativeOptions {
        viewport,
        ..Default::default()
    };
    eframe::run_native(
        "freezeframe console",
        options,
        Box::new(|_cc| Ok(Box::new(app))),
    )
    .map_err(|e| Error::Window(e.to_string()))
}
