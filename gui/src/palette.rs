//! Phases and how they look: one Okabe–Ito colour per phase (a palette people
//! with the common colour-vision deficiencies can tell apart) and, because
//! colour alone is never enough, a letter drawn in every bar and a word in
//! every legend and label.

use egui::Color32;

/// A node or writer phase, as named in `docs/protocol.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PhaseKind {
    Idle,
    Freezing,
    Frozen,
    Committing,
    PostSnapshot,
    Thawing,
    Done,
    Aborted,
    /// A word this console does not know (a newer node); drawn in grey with `?`.
    Other,
}

impl PhaseKind {
    /// The phases a snapshot goes through, in the order the legend lists them.
    pub const SNAPSHOT: [PhaseKind; 7] = [
        PhaseKind::Freezing,
        PhaseKind::Frozen,
        PhaseKind::Committing,
        PhaseKind::PostSnapshot,
        PhaseKind::Thawing,
        PhaseKind::Done,
        PhaseKind::Aborted,
    ];

    pub fn parse(word: &str) -> PhaseKind {
        match word {
            "idle" => PhaseKind::Idle,
            "freezing" => PhaseKind::Freezing,
            "frozen" => PhaseKind::Frozen,
            "committing" => PhaseKind::Committing,
            "post_snapshot" => PhaseKind::PostSnapshot,
            "thawing" => PhaseKind::Thawing,
            "done" => PhaseKind::Done,
            "aborted" => PhaseKind::Aborted,
            _ => PhaseKind::Other,
        }
    }

    /// The word shown to people (`post-snapshot`, not `post_snapshot`).
    pub fn label(self) -> &'static str {
        match self {
            PhaseKind::Idle => "idle",
            PhaseKind::Freezing => "freezing",
            PhaseKind::Frozen => "frozen",
            PhaseKind::Committing => "committing",
            PhaseKind::PostSnapshot => "post-snapshot",
            PhaseKind::Thawing => "thawing",
            PhaseKind::Done => "done",
            PhaseKind::Aborted => "aborted",
            PhaseKind::Other => "unknown",
        }
    }

    /// The letter drawn inside a bar, so bars differ without colour.
    pub fn letter(self) -> &'static str {
        match self {
            PhaseKind::Idle => "I",
            PhaseKind::Freezing => "F",
            PhaseKind::Frozen => "Z",
            PhaseKind::Committing => "C",
            PhaseKind::PostSnapshot => "P",
            PhaseKind::Thawing => "T",
            PhaseKind::Done => "D",
            PhaseKind::Aborted => "A",
            PhaseKind::Other => "?",
        }
    }

    /// Okabe–Ito colours. Frozen and committing (the freeze window an operator
    /// watches) get the two strongest, blue and orange; aborted gets vermillion.
    pub fn color(self) -> Color32 {
        match self {
            PhaseKind::Idle => Color32::from_rgb(0x99, 0x99, 0x99),
            PhaseKind::Freezing => Color32::from_rgb(0x56, 0xB4, 0xE9), // sky blue
            PhaseKind::Frozen => Color32::from_rgb(0x00, 0x72, 0xB2),   // blue
            PhaseKind::Committing => Color32::from_rgb(0xE6, 0x9F, 0x00), // orange
            PhaseKind::PostSnapshot => Color32::from_rgb(0x00, 0x9E, 0x73), // bluish green
            PhaseKind::Thawing => Color32::from_rgb(0xF0, 0xE4, 0x42),  // yellow
            PhaseKind::Done => Color32::from_rgb(0xCC, 0x79, 0xA7),     // reddish purple
            PhaseKind::Aborted => Color32::from_rgb(0xD5, 0x5E, 0x00),  // vermillion
            PhaseKind::Other => Color32::from_rgb(0x99, 0x99, 0x99),
        }
    }

    /// Black or white, whichever reads better on [`PhaseKind::color`].
    pub fn text_color(self) -> Color32 {
        match self {
            PhaseKind::Frozen | PhaseKind::PostSnapshot | PhaseKind::Aborted => Color32::WHITE,
            _ => Color32::BLACK,
        }
    }
}

/// A phase word for people: `post_snapshot` → `post-snapshot`; unknown words as they are.
pub fn phase_label(word: &str) -> String {
    match PhaseKind::parse(word) {
        PhaseKind::Other => word.to_string(),
        k => k.label().to_string(),
    }
}

/// Connection dot colours: Okabe–Ito bluish green for up, vermillion for down,
/// always next to the words "connected" / "unreachable".
pub const CONNECTED: Color32 = Color32::from_rgb(0x00, 0x9E, 0x73);
pub const UNREACHABLE: Color32 = Color32::from_rgb(0xD5, 0x5E, 0x00);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_snapshot_phase_has_its_own_colour_and_letter() {
        let colors: std::collections::HashSet<_> =
            PhaseKind::SNAPSHOT.iter().map(|p| p.color()).collect();
        let letters: std::collections::HashSet<_> =
            PhaseKind::SNAPSHOT.iter().map(|p| p.letter()).collect();
        assert_eq!(colors.len(), PhaseKind::SNAPSHOT.len());
        assert_eq!(letters.len(), PhaseKind::SNAPSHOT.len());
    }

    #[test]
    fn protocol_words_round_trip_and_unknown_words_survive() {
        assert_eq!(PhaseKind::parse("post_snapshot"), PhaseKind::PostSnapshot);
        assert_eq!(phase_label("post_snapshot"), "post-snapshot");
        assert_eq!(phase_label("resyncing"), "resyncing");
    }
}
