//! The console application: persisted [`Settings`] apart from the runtime
//! handles, one [`Model`], the backend handle, and the one place
//! ([`ConsoleApp::apply`]) where the panels' commands take effect.
//!
//! Use it without eframe (tests): `ConsoleApp::new(handle, "n1")`, then each
//! frame `app.show(ui)`, which first drains the backend (`app.poll()`).

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::backend::{BackendHandle, Request};
use crate::model::{JobKind, Model};
use crate::panels::{self, Command};

/// What the console remembers between runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Backup repository; empty until the operator sets one (Back up is disabled until then).
    pub repository: String,
}

impl Settings {
    /// `$XDG_CONFIG_HOME/freezeframe/console.json` (or `~/.config/…`).
    pub fn default_path() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
        Some(base.join("freezeframe").join("console.json"))
    }

    /// The saved settings; a missing file is the defaults, a broken one is
    /// reported (with its path) and replaced by the defaults.
    pub fn load(path: &std::path::Path) -> Settings {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!("ignoring console settings {}: {e}", path.display());
                Settings::default()
            }),
            Err(_) => Settings::default(),
        }
    }

    pub fn save(&self, path: &std::path::Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, json)
    }
}

/// State of the window itself that is neither persisted nor part of the cluster model.
#[derive(Debug, Default)]
struct UiState {
    /// The snapshot whose deletion waits for confirmation.
    confirm_delete: Option<u64>,
}

/// The console.
#[derive(Debug)]
pub struct ConsoleApp {
    pub settings: Settings,
    settings_path: Option<PathBuf>,
    pub model: Model,
    ui: UiState,
    backend: BackendHandle,
    /// Fixed clock for tests and screenshots; the wall clock otherwise.
    clock: Option<u64>,
}

impl ConsoleApp {
    /// A console talking to `backend`, showing `node` as the node it is connected to.
    pub fn new(backend: BackendHandle, node: impl Into<String>) -> ConsoleApp {
        ConsoleApp {
            settings: Settings::default(),
            settings_path: None,
            model: Model::new(node),
            ui: UiState::default(),
            backend,
            clock: None,
        }
    }

    /// Loads the settings from `path` and saves them there on exit.
    pub fn with_settings_file(mut self, path: PathBuf) -> ConsoleApp {
        self.settings = Settings::load(&path);
        self.settings_path = Some(path);
        self
    }

    /// Freezes the clock at `now_ms` (tests).
    pub fn with_clock(mut self, now_ms: u64) -> ConsoleApp {
        self.clock = Some(now_ms);
        self
    }

    fn now_ms(&self) -> u64 {
        self.clock.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0)
        })
    }

    /// Applies every update the backend has sent so far; never blocks.
    pub fn poll(&mut self) -> usize {
        let mut n = 0;
        while let Some(u) = self.backend.try_recv() {
            self.model.apply(u);
            n += 1;
        }
        n
    }

    /// Polls the backend until `done(&model)` holds or `timeout` passes;
    /// `true` when it held. For tests and scripts against a real node (the
    /// window itself never waits): updates arrive from the backend thread
    /// whenever the node answers, so a test waits for the state it expects
    /// before drawing and querying a frame.
    pub fn wait_for(&mut self, timeout: Duration, done: impl Fn(&Model) -> bool) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            self.poll();
            if done(&self.model) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The one place commands take effect.
    pub fn apply(&mut self, ctx: &egui::Context, cmd: Command) {
        match cmd {
            Command::TakeSnapshot => {
                self.model.snapshot_requested();
                self.backend.send(Request::TakeSnapshot);
            }
            Command::Verify(id) => {
                self.model.job_requested(JobKind::Verify, id);
                self.backend.send(Request::Verify(id));
            }
            Command::Backup(id) => {
                let repo = self.settings.repository.trim();
                if !repo.is_empty() {
                    self.model.job_requested(JobKind::Backup, id);
                    self.backend.send(Request::Backup {
                        id,
                        repo: PathBuf::from(repo),
                    });
                }
            }
            Command::OpenMount(id) => {
                if let Some(path) = self.model.row(id).and_then(|r| r.path.clone()) {
                    self.backend.send(Request::OpenPath(path));
                }
            }
            Command::AskDelete(id) => self.ui.confirm_delete = Some(id),
            Command::Delete(id) => {
                self.ui.confirm_delete = None;
                self.backend.send(Request::Delete(id));
            }
            Command::CancelDelete => self.ui.confirm_delete = None,
            Command::CancelJob => self.backend.send(Request::CancelJob),
            Command::CopyText(text) => ctx.copy_text(text),
            Command::DismissPath => self.model.show_path = None,
            Command::SetRepository(repo) => self.settings.repository = repo,
        }
    }

    /// One frame: drain the backend, draw, apply what the operator did.
    pub fn show(&mut self, ui: &mut egui::Ui) {
        let ctx = ui.ctx().clone();
        self.backend.set_context(&ctx);
        self.poll();
        let now = self.now_ms();
        let mut cmds = Vec::new();

        egui::Panel::top("toolbar").show(ui, |ui| {
            ui.add_space(4.0);
            cmds.extend(panels::toolbar(ui, &self.model));
            ui.add_space(4.0);
        });
        let side_w = ui.text_style_height(&egui::TextStyle::Body) * 24.0;
        egui::Panel::left("cluster")
            .default_size(side_w)
            .resizable(true)
            .show(ui, |ui| {
                egui::ScrollArea::vertical()
                    .id_salt("side-scroll")
                    .show(ui, |ui| {
                        ui.add_space(4.0);
                        panels::cluster(ui, &self.model);
                        ui.separator();
                        cmds.extend(panels::job(ui, &self.model));
                        if self.model.job.is_some() {
                            ui.separator();
                        }
                        cmds.extend(panels::settings(ui, &self.settings.repository));
                    });
            });
        egui::CentralPanel::default().show(ui, |ui| {
            egui::ScrollArea::vertical()
                .id_salt("main-scroll")
                .show(ui, |ui| {
                    panels::timeline(ui, &self.model, now);
                    ui.separator();
                    panels::freeze_plot(ui, &self.model);
                    ui.separator();
                    cmds.extend(panels::snapshots(
                        ui,
                        &self.model,
                        &self.settings.repository,
                    ));
                });
        });
        if let Some(id) = self.ui.confirm_delete {
            cmds.extend(panels::confirm_delete(&ctx, id));
        }
        if let Some(path) = self.model.show_path.clone() {
            cmds.extend(panels::path_window(&ctx, &path));
        }
        for c in cmds {
            self.apply(&ctx, c);
        }
        // Open bars grow with time while a snapshot runs.
        if self.model.timeline(now).is_some_and(|t| t.running) {
            ctx.request_repaint_after(Duration::from_millis(100));
        }
    }
}

impl eframe::App for ConsoleApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.show(ui);
    }

    fn on_exit(&mut self, _gl: Option<&eframe::glow::Context>) {
        if let Some(path) = &self.settings_path {
            if let Err(e) = self.settings.save(path) {
                tracing::warn!("cannot save console settings to {}: {e}", path.display());
            }
        }
    }
}
