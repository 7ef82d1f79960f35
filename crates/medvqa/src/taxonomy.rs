//! The 8 imaging modalities and 5 question types of OmniMedVQA / Med-R1.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Modality {
    #[serde(rename = "CT")]
    Ct,
    #[serde(rename = "MRI")]
    Mri,
    #[serde(rename = "X-Ray")]
    XRay,
    #[serde(rename = "Ultrasound")]
    Ultrasound,
    #[serde(rename = "Dermoscopy")]
    Dermoscopy,
    #[serde(rename = "Fundus")]
    Fundus,
    #[serde(rename = "OCT")]
    Oct,
    #[serde(rename = "Microscopy")]
    Microscopy,
}

impl Modality {
    pub const ALL: [Modality; 8] = [
        Modality::Ct,
        Modality::Mri,
        Modality::XRay,
        Modality::Ultrasound,
        Modality::Dermoscopy,
        Modality::Fundus,
        Modality::Oct,
        Modality::Microscopy,
    ];

    /// Short name, as in the paper's tables.
    pub fn name(self) -> &'static str {
        match self {
            Modality::Ct => "CT",
            Modality::Mri => "MRI",
            Modality::XRay => "X-Ray",
            Modality::Ultrasound => "Ultrasound",
            Modality::Dermoscopy => "Dermoscopy",
            Modality::Fundus => "Fundus",
            Modality::Oct => "OCT",
            Modality::Microscopy => "Microscopy",
        }
    }

    /// Reads the names used by OmniMedVQA's `modality_type`, Med-R1's split file names
    /// (`CT(Computed Tomography)`, `MR (Mag-netic Resonance Imaging)`, `OCT (Optical Coherence
    /// Tomography`, `ultrasound`, ...) and the short names.
    pub fn parse(s: &str) -> Option<Modality> {
        let l = s.trim().to_ascii_lowercase();
        let starts = |p: &str| l.starts_with(p);
        Some(if starts("ct") || l.contains("computed tomography") {
            Modality::Ct
        } else if starts("mr") || l.contains("magnetic") || l.contains("mag-netic") {
            Modality::Mri
        } else if starts("x-ray") || starts("xray") || starts("x ray") {
            Modality::XRay
        } else if starts("ultrasound") || starts("us") {
            Modality::Ultrasound
        } else if starts("dermoscopy") {
            Modality::Dermoscopy
        } else if starts("fundus") {
            Modality::Fundus
        } else if starts("oct") || l.contains("optical coherence") {
            Modality::Oct
        } else if starts("microscopy") {
            Modality::Microscopy
        } else {
            return None;
        })
    }
}

impl std::fmt::Display for Modality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum QuestionType {
    #[serde(rename = "Anatomy Identification")]
    AnatomyIdentification,
    #[serde(rename = "Disease Diagnosis")]
    DiseaseDiagnosis,
    #[serde(rename = "Lesion Grading")]
    LesionGrading,
    #[serde(rename = "Modality Recognition")]
    ModalityRecognition,
    #[serde(rename = "Other Biological Attributes")]
    OtherBiologicalAttributes,
}

impl QuestionType {
    pub const ALL: [QuestionType; 5] = [
        QuestionType::AnatomyIdentification,
        QuestionType::DiseaseDiagnosis,
        QuestionType::LesionGrading,
        QuestionType::ModalityRecognition,
        QuestionType::OtherBiologicalAttributes,
    ];

    pub fn name(self) -> &'static str {
        match self {
            QuestionType::AnatomyIdentification => "Anatomy Identification",
            QuestionType::DiseaseDiagnosis => "Disease Diagnosis",
            QuestionType::LesionGrading => "Lesion Grading",
            QuestionType::ModalityRecognition => "Modality Recognition",
            QuestionType::OtherBiologicalAttributes => "Other Biological Attributes",
        }
    }

    /// Short label for table columns.
    pub fn short(self) -> &'static str {
        match self {
            QuestionType::AnatomyIdentification => "AI",
            QuestionType::DiseaseDiagnosis => "DD",
            QuestionType::LesionGrading => "LG",
            QuestionType::ModalityRecognition => "MR",
            QuestionType::OtherBiologicalAttributes => "OBA",
        }
    }

    pub fn parse(s: &str) -> Option<QuestionType> {
        let l = s.trim().to_ascii_lowercase();
        QuestionType::ALL.into_iter().find(|q| {
            l.starts_with(&q.name().to_ascii_lowercase()) || l == q.short().to_ascii_lowercase()
        })
    }
}

impl std::fmt::Display for QuestionType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn med_r1_file_names_parse() {
        let cases = [
            ("CT(Computed Tomography)", Modality::Ct),
            ("MR (Mag-netic Resonance Imaging)", Modality::Mri),
            ("OCT (Optical Coherence Tomography", Modality::Oct),
            ("ultrasound", Modality::Ultrasound),
            ("Fundus Photography", Modality::Fundus),
            ("Microscopy Images", Modality::Microscopy),
            ("X-Ray", Modality::XRay),
            ("Dermoscopy", Modality::Dermoscopy),
        ];
        for (s, m) in cases {
            assert_eq!(Modality::parse(s), Some(m), "{s}");
        }
        assert_eq!(Modality::parse("unknown"), None);
        assert_eq!(
            QuestionType::parse("Lesion Grading"),
            Some(QuestionType::LesionGrading)
        );
        assert_eq!(
            QuestionType::parse("Other Biological Attributes"),
            Some(QuestionType::OtherBiologicalAttributes)
        );
    }
}
