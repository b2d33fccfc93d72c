//! The panels: functions that draw one part of the window from the model and
//! return the [`Command`]s the operator gave; [`crate::app::ConsoleApp::apply`]
//! is the one place that acts on them. No panel touches the backend.
//!
//! Every button and value has an accessible label (the kittest tests find
//! widgets by it); buttons repeated per row carry the snapshot id in theirs
//! ("Verify snapshot 7") while showing a short word.

use egui::{Align2, Color32, FontId, Rect, RichText, Sense, Stroke, Ui, Vec2, WidgetInfo};

use crate::format;
use crate::model::{JobKind, Link, Model, Timeline};
use crate::palette::{self, PhaseKind};

/// What the operator asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    TakeSnapshot,
    Verify(u64),
    Backup(u64),
    OpenMount(u64),
    /// Ask for confirmation before deleting.
    AskDelete(u64),
    /// Confirmed.
    Delete(u64),
    CancelDelete,
    CancelJob,
    CopyText(String),
    DismissPath,
    /// The backup repository field changed.
    SetRepository(String),
}

/// A button showing `text` whose accessible name is `label`.
fn button(ui: &mut Ui, enabled: bool, text: &str, label: &str) -> egui::Response {
    let resp = ui.add_enabled(enabled, egui::Button::new(text));
    let label = label.to_string();
    resp.widget_info(|| WidgetInfo::labeled(egui::Role::Button, enabled, label.clone()));
    resp
}

/// A small filled circle, then the words, so the state never rests on colour alone.
fn dot(ui: &mut Ui, color: Color32) {
    let size = ui.text_style_height(&egui::TextStyle::Body) * 0.6;
    let (rect, _) = ui.allocate_exact_size(Vec2::splat(size), Sense::hover());
    ui.painter().circle_filled(rect.center(), size / 2.0, color);
}

/// The title line, the unreachable banner, the notice, and the Take snapshot button.
pub fn toolbar(ui: &mut Ui, model: &Model) -> Vec<Command> {
    let mut out = Vec::new();
    ui.horizontal(|ui| {
        ui.heading("freezeframe console");
        let cluster = if model.cluster.is_empty() { String::new() } else { format!("cluster {} · ", model.cluster) };
        ui.label(format!("{cluster}via node {}", model.node));
        ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
            let can = model.link == Link::Connected && !model.creating;
            let resp = ui
                .add_enabled(
                    can,
                    egui::Button::new(RichText::new("Take snapshot").strong().color(Color32::WHITE))
                        .fill(PhaseKind::Frozen.color()),
                )
                .on_hover_text("Take a cluster-wide application-consistent snapshot with this node as initiator")
                .on_disabled_hover_text(if model.creating {
                    "A snapshot is being taken"
                } else {
                    "The node is not connected"
                });
            resp.widget_info(|| WidgetInfo::labeled(egui::Role::Button, can, "Take snapshot"));
            if resp.clicked() {
                out.push(Command::TakeSnapshot);
            }
            if model.creating {
                ui.spinner();
                ui.label("snapshot running…");
            }
        });
    });
    if let Some(text) = model.banner() {
        egui::Frame::new()
            .fill(palette::UNREACHABLE)
            .inner_margin(6.0)
            .corner_radius(4.0)
            .show(ui, |ui| {
                ui.set_width(ui.available_width());
                ui.label(RichText::new(text.clone()).color(Color32::WHITE).strong());
            });
    } else if model.link == Link::Connecting {
        ui.horizontal(|ui| {
            ui.spinner();
            ui.label(format!("connecting to node {}…", model.node));
        });
    }
    if let Some(n) = &model.notice {
        let color = if n.error {
            palette::UNREACHABLE
        } else {
            ui.visuals().text_color()
        };
        ui.label(RichText::new(&n.text).color(color));
    }
    out
}

/// Every node: connection dot and word, phase, snapshot, and its writers.
pub fn cluster(ui: &mut Ui, model: &Model) {
    ui.heading("Cluster");
    if model.nodes.is_empty() {
        ui.label("No status from the node yet.");
        return;
    }
    let stale = model.link != Link::Connected;
    if stale {
        ui.label(RichText::new("Last known state (the node is not answering):").italics());
    }
    egui::Grid::new("cluster-grid")
        .num_columns(3)
        .spacing([12.0, 4.0])
        .striped(true)
        .show(ui, |ui| {
            for n in &model.nodes {
                ui.horizontal(|ui| {
                    dot(
                        ui,
                        if n.connected && !stale {
                            palette::CONNECTED
                        } else {
                            palette::UNREACHABLE
                        },
                    );
                    ui.label(RichText::new(&n.name).strong());
                });
                ui.label(if n.connected {
                    "connected"
                } else {
                    "unreachable"
                });
                phase_chip(ui, &n.phase);
                ui.end_row();
                for w in &n.writers {
                    ui.label(RichText::new(format!("      {}", w.name)));
                    ui.label(RichText::new("writer").weak());
                    phase_chip(ui, &w.state);
                    ui.end_row();
                }
                if n.writers.is_empty() {
                    ui.label(RichText::new("    no writers").weak());
                    ui.end_row();
                }
            }
        });
}

/// A phase word on its colour, with its letter.
fn phase_chip(ui: &mut Ui, word: &str) {
    let kind = PhaseKind::parse(word);
    let text = palette::phase_label(word);
    if matches!(kind, PhaseKind::Idle | PhaseKind::Other) {
        ui.label(text);
        return;
    }
    let rich = RichText::new(format!("{} {text}", kind.letter()))
        .color(kind.text_color())
        .background_color(kind.color());
    ui.label(rich);
}

/// The settings area: where backups go.
pub fn settings(ui: &mut Ui, repo: &str) -> Vec<Command> {
    let mut out = Vec::new();
    ui.heading("Settings");
    let label = ui.label("Backup repository");
    let mut text = repo.to_string();
    let resp = ui
        .add(
            egui::TextEdit::singleline(&mut text)
                .hint_text("/path/to/backup/repo")
                .desired_width(f32::INFINITY),
        )
        .labelled_by(label.id);
    if resp.changed() {
        out.push(Command::SetRepository(text));
    }
    out
}

/// The running long operation: progress and Cancel.
pub fn job(ui: &mut Ui, model: &Model) -> Vec<Command> {
    let mut out = Vec::new();
    let Some(j) = &model.job else { return out };
    ui.heading("Running");
    let what = match j.kind {
        JobKind::Verify => format!("Verifying snapshot {}", j.snapshot),
        JobKind::Backup => format!("Backing up snapshot {}", j.snapshot),
    };
    let bar = match j.fraction() {
        Some(f) => egui::ProgressBar::new(f).text(format!("{what}: {:.0}%", f * 100.0)),
        None => egui::ProgressBar::new(0.0)
            .text(format!("{what}: starting"))
            .animate(true),
    };
    ui.add(bar);
    if let Some(p) = j.progress {
        ui.label(format!(
            "{} of {}",
            format::bytes(p.done),
            format::bytes(p.total)
        ));
    }
    if button(ui, true, "Cancel", "Cancel").clicked() {
        out.push(Command::CancelJob);
    }
    out
}

/// Height of one timeline track, from the font so 200% scale stays proportional.
fn track_height(ui: &Ui) -> f32 {
    ui.text_style_height(&egui::TextStyle::Body) * 1.9
}

/// The running or last snapshot: one row per node, a bar per phase on a shared
/// time axis, the freeze window shaded, the failure spelled out.
pub fn timeline(ui: &mut Ui, model: &Model, now_ms: u64) {
    let Some(t) = model.timeline(now_ms) else {
        ui.heading("Timeline");
        ui.label("No snapshot since the console opened. Take one (or wait for one) to see every node's phases here.");
        return;
    };
    ui.horizontal(|ui| {
        ui.heading(format!("Snapshot {} timeline", t.snapshot));
        if t.running {
            ui.spinner();
        }
        if let Some((a, b)) = t.freeze_window {
            let running = t.running && t.freeze_window.is_some_and(|(_, e)| e >= now_ms);
            let word = if running {
                "freeze window so far"
            } else {
                "freeze window"
            };
            ui.label(RichText::new(format!("{word}: {}", format::millis(b - a))).strong());
        }
    });
    draw_tracks(ui, &t);
    legend(ui);
    if let Some(f) = &t.failure {
        ui.label(
            RichText::new(f.sentence(t.snapshot))
                .color(palette::UNREACHABLE)
                .strong(),
        );
    }
}

fn draw_tracks(ui: &mut Ui, t: &Timeline) {
    let row_h = track_height(ui);
    let name_w = ui.text_style_height(&egui::TextStyle::Body) * 9.0;
    let axis_h = ui.text_style_height(&egui::TextStyle::Small) * 1.6;
    let width = ui.available_width().max(200.0);
    let (rect, _) = ui.allocate_exact_size(
        Vec2::new(width, row_h * t.tracks.len() as f32 + axis_h),
        Sense::hover(),
    );
    let painter = ui.painter_at(rect);
    let visuals = ui.visuals().clone();
    let span = (t.end_ms.saturating_sub(t.start_ms)).max(1) as f32;
    let plot_left = rect.left() + name_w;
    // Room on the right for the end-state marker drawn after the last bar.
    let plot_w = (rect.right() - plot_left - row_h * 0.6 - 8.0).max(10.0);
    let x_of = |ms: u64| plot_left + (ms.saturating_sub(t.start_ms)) as f32 / span * plot_w;
    let body = FontId::proportional(ui.text_style_height(&egui::TextStyle::Body) * 0.85);
    let small = egui::TextStyle::Small.resolve(ui.style());

    // The freeze window behind every track.
    if let Some((a, b)) = t.freeze_window {
        let shade = Rect::from_x_y_ranges(
            x_of(a)..=x_of(b).max(x_of(a) + 1.0),
            rect.top()..=rect.bottom() - axis_h,
        );
        painter.rect_filled(shade, 0.0, visuals.text_color().gamma_multiply(0.10));
        let edge = Stroke::new(2.0, visuals.text_color().gamma_multiply(0.8));
        painter.line_segment([shade.left_top(), shade.left_bottom()], edge);
        painter.line_segment([shade.right_top(), shade.right_bottom()], edge);
    }

    for (i, track) in t.tracks.iter().enumerate() {
        let top = rect.top() + i as f32 * row_h;
        let current = track.current.map(|c| c.label()).unwrap_or("waiting");
        // The node's name and where it is now; also its accessible name ("n1: done").
        let name_rect =
            Rect::from_min_size(egui::pos2(rect.left(), top), Vec2::new(name_w - 6.0, row_h));
        let row_label = format!("{}: {current}", track.node);
        let resp = ui.interact(
            name_rect,
            ui.scope_id().with(("track", &track.node)),
            Sense::hover(),
        );
        let l = row_label.clone();
        resp.widget_info(|| WidgetInfo::labeled(egui::Role::Label, true, l.clone()));
        painter.text(
            name_rect.left_center(),
            Align2::LEFT_CENTER,
            &row_label,
            body.clone(),
            visuals.text_color(),
        );

        for (j, bar) in track.bars.iter().enumerate() {
            let end = bar.end_ms.unwrap_or(t.end_ms);
            let x0 = x_of(bar.start_ms);
            // End states are instants: a fixed-width marker.
            let x1 = if matches!(bar.phase, PhaseKind::Done | PhaseKind::Aborted) {
                x0 + row_h * 0.6
            } else {
                x_of(end).max(x0 + 2.0)
            };
            let r = Rect::from_x_y_ranges(x0..=x1, (top + row_h * 0.15)..=(top + row_h * 0.85));
            painter.rect_filled(r, 2.0, bar.phase.color());
            if bar.end_ms.is_none() {
                // Still running: a hatched right edge says "open".
                painter.line_segment(
                    [r.right_top(), r.right_bottom()],
                    Stroke::new(2.0, visuals.text_color()),
                );
            }
            let letter_w = body.size * 0.9;
            if r.width() >= letter_w {
                painter.text(
                    r.center(),
                    Align2::CENTER_CENTER,
                    bar.phase.letter(),
                    body.clone(),
                    bar.phase.text_color(),
                );
            }
            let dur = end.saturating_sub(bar.start_ms);
            let label = if matches!(bar.phase, PhaseKind::Done | PhaseKind::Aborted) {
                format!(
                    "{} {} at +{}",
                    track.node,
                    bar.phase.label(),
                    format::millis(bar.start_ms - t.start_ms)
                )
            } else {
                format!(
                    "{} {} {}",
                    track.node,
                    bar.phase.label(),
                    format::millis(dur)
                )
            };
            let resp = ui.interact(
                r,
                ui.scope_id().with(("bar", &track.node, j)),
                Sense::hover(),
            );
            let l = label.clone();
            resp.widget_info(|| WidgetInfo::labeled(egui::Role::Label, true, l.clone()));
            resp.on_hover_text(label);
        }
    }

    // The time axis: ticks at round milliseconds.
    let axis_y = rect.bottom() - axis_h;
    painter.line_segment(
        [
            egui::pos2(plot_left, axis_y),
            egui::pos2(plot_left + plot_w, axis_y),
        ],
        visuals.widgets.noninteractive.fg_stroke,
    );
    let step = nice_step(span as f64 / 8.0).max(1.0);
    let mut ms = 0.0;
    while ms <= span as f64 {
        let x = plot_left + ms as f32 / span * plot_w;
        painter.line_segment(
            [egui::pos2(x, axis_y), egui::pos2(x, axis_y + 4.0)],
            visuals.widgets.noninteractive.fg_stroke,
        );
        painter.text(
            egui::pos2(x, axis_y + 4.0),
            Align2::CENTER_TOP,
            format::millis(ms as u64),
            small.clone(),
            visuals.weak_text_color(),
        );
        ms += step;
    }
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if raw <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * p)
}

/// Colour, letter and word of every phase.
fn legend(ui: &mut Ui) {
    ui.horizontal_wrapped(|ui| {
        for k in PhaseKind::SNAPSHOT {
            ui.label(
                RichText::new(format!(" {} ", k.letter()))
                    .color(k.text_color())
                    .background_color(k.color())
                    .strong(),
            );
            ui.label(k.label());
            ui.add_space(6.0);
        }
        ui.label(
            RichText::new("shaded: freeze window (first writer frozen to last writer thawed)")
                .weak(),
        );
    });
}

/// Freeze-window durations of the last snapshots.
pub fn freeze_plot(ui: &mut Ui, model: &Model) {
    let hist = model.freeze_history(30);
    ui.heading("Freeze window, last snapshots");
    if hist.is_empty() {
        ui.label("No completed snapshot with writers yet.");
        return;
    }
    let last = hist
        .last()
        .map(|(id, ms)| format!("last: snapshot {id}, {}", format::millis(*ms)))
        .unwrap_or_default();
    ui.label(last);
    let bars: Vec<egui_plot::Bar> = hist
        .iter()
        .map(|(id, ms)| {
            egui_plot::Bar::new(*id as f64, *ms as f64)
                .name(format!("snapshot {id}"))
                .width(0.7)
        })
        .collect();
    let chart =
        egui_plot::BarChart::new("freeze window (ms)", bars).color(PhaseKind::Frozen.color());
    egui_plot::Plot::new("freeze-plot")
        .height(ui.text_style_height(&egui::TextStyle::Body) * 9.0)
        .allow_drag(false)
        .allow_zoom(false)
        .allow_scroll(false)
        .x_axis_label("snapshot")
        // Snapshot ids are whole numbers; no ticks between them.
        .x_axis_formatter(|mark, _| {
            if mark.value.fract() == 0.0 {
                format!("{}", mark.value)
            } else {
                String::new()
            }
        })
        .y_axis_label("ms")
        // Wide enough for "2000": a narrow axis drops its labels.
        .y_axis_min_width(ui.text_style_height(&egui::TextStyle::Body) * 2.5)
        .y_axis_formatter(|mark, _| format!("{:.0}", mark.value))
        .include_y(0.0)
        .show(ui, |p| p.bar_chart(chart));
}

/// The snapshots table with its actions.
pub fn snapshots(ui: &mut Ui, model: &Model, repo: &str) -> Vec<Command> {
    let mut out = Vec::new();
    ui.heading("Snapshots");
    if model.snapshots.is_empty() {
        ui.label("No snapshots on the volume.");
        return out;
    }
    let connected = model.link == Link::Connected;
    let job_free = model.job.is_none();
    egui::ScrollArea::horizontal()
        .id_salt("snapshots-scroll")
        .auto_shrink([false, true])
        .show(ui, |ui| {
            egui::Grid::new("snapshots-grid")
                .num_columns(8)
                .striped(true)
                .spacing([14.0, 6.0])
                .show(ui, |ui| {
                    for h in [
                        "Id",
                        "Time",
                        "Initiator",
                        "Status",
                        "Diff area",
                        "Changed blocks",
                        "Actions",
                        "Mounted at",
                    ] {
                        ui.label(RichText::new(h).strong());
                    }
                    ui.end_row();
                    for row in model.snapshots.iter().rev() {
                        let id = row.id;
                        ui.label(id.to_string());
                        ui.label(format::utc(row.created_ms));
                        ui.label(&row.initiator);
                        let status = match (&row.status[..], &row.reason) {
                            ("invalid", Some(r)) => format!("invalid: {r}"),
                            (s, _) if row.blake3.is_some() => format!("{s}, verified"),
                            (s, _) => s.to_string(),
                        };
                        ui.label(status);
                        ui.label(format::bytes(row.diff_bytes));
                        ui.label(
                            row.changed_blocks
                                .map(|b| b.to_string())
                                .unwrap_or_else(|| "–".into()),
                        );
                        ui.horizontal(|ui| {
                            let usable = connected && row.status != "invalid";
                            if button(
                                ui,
                                usable && job_free,
                                "Verify",
                                &format!("Verify snapshot {id}"),
                            )
                            .on_hover_text("Hash the snapshot image and record the hash")
                            .clicked()
                            {
                                out.push(Command::Verify(id));
                            }
                            let has_repo = !repo.trim().is_empty();
                            let b = button(
                                ui,
                                usable && job_free && has_repo,
                                "Back up",
                                &format!("Back up snapshot {id}"),
                            );
                            let b = if has_repo {
                                b.on_hover_text(format!("Back up to {repo}"))
                            } else {
                                b.on_disabled_hover_text(
                                    "Set a backup repository in Settings first",
                                )
                            };
                            if b.clicked() {
                                out.push(Command::Backup(id));
                            }
                            if button(
                                ui,
                                row.path.is_some(),
                                "Open",
                                &format!("Open mount of snapshot {id}"),
                            )
                            .on_hover_text("Open the mounted snapshot in the file manager")
                            .clicked()
                            {
                                out.push(Command::OpenMount(id));
                            }
                            if button(ui, connected, "Delete…", &format!("Delete snapshot {id}"))
                                .clicked()
                            {
                                out.push(Command::AskDelete(id));
                            }
                        });
                        // Last: the longest and least often needed column.
                        ui.label(row.path.as_deref().unwrap_or("not mounted"));
                        ui.end_row();
                    }
                });
            // Room for the floating horizontal scroll bar, which would otherwise lie
            // over the last row's buttons.
            ui.add_space(
                ui.spacing().scroll.bar_width + ui.spacing().scroll.bar_outer_margin + 6.0,
            );
        });
    out
}

/// The confirmation before a delete.
pub fn confirm_delete(ctx: &egui::Context, id: u64) -> Vec<Command> {
    let mut out = Vec::new();
    egui::Modal::new(egui::Id::unique("confirm-delete")).show(ctx, |ui| {
        ui.heading(format!("Delete snapshot {id}?"));
        ui.label("Its diff area and mount are removed on every node. This cannot be undone.");
        ui.horizontal(|ui| {
            if button(ui, true, "Yes, delete", "Yes, delete").clicked() {
                out.push(Command::Delete(id));
            }
            if button(ui, true, "Keep it", "Keep it").clicked() {
                out.push(Command::CancelDelete);
            }
        });
    });
    out
}

/// A mount path that could not be opened, with a Copy button.
pub fn path_window(ctx: &egui::Context, path: &str) -> Vec<Command> {
    let mut out = Vec::new();
    egui::Modal::new(egui::Id::unique("show-path")).show(ctx, |ui| {
        ui.heading("Mounted snapshot");
        ui.label("No file manager could be started; the snapshot is mounted at:");
        ui.monospace(path);
        ui.horizontal(|ui| {
            if button(ui, true, "Copy", "Copy path").clicked() {
                out.push(Command::CopyText(path.to_string()));
            }
            if button(ui, true, "Close", "Close").clicked() {
                out.push(Command::DismissPath);
            }
        });
    });
    out
}

#[cfg(test)]
mod tests {
    use super::nice_step;

    #[test]
    fn axis_steps_are_round_numbers() {
        assert_eq!(nice_step(0.7), 1.0);
        assert_eq!(nice_step(13.0), 20.0);
        assert_eq!(nice_step(120.0), 200.0);
        assert_eq!(nice_step(450.0), 500.0);
    }
}
