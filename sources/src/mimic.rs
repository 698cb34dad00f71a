//! MIMIC-CXR as released (shared/design/sources.md A.1): `mimic-cxr-2.0.0-metadata.csv.gz` (one row per image,
//! `dicom_id, subject_id, study_id, ViewPosition, StudyDate, …`) beside the images at
//! `files/p<first two digits of subject_id>/p<subject_id>/s<study_id>/<dicom_id>.dcm` (`.jpg` in MIMIC-CXR-JPG),
//! joined with MIMIC-IV's `hosp/patients.csv.gz` (sex, anchor age) and `hosp/admissions.csv.gz` (race).
//!
//! Findings are study-level: a CheXbert output CSV (`--labels`: `subject_id, study_id` + the 14 CheXpert names in the
//! CheXpert convention, the paper's choice), else the release's own `mimic-cxr-2.0.0-chexpert.csv.gz` (or `-negbio`).
//! A study with no label row has every finding missing; label rows for studies with no image are counted.
//! Age is `anchor_age + year(StudyDate) - anchor_year`. Race is the subject's admissions' `race` (`ethnicity` in
//! MIMIC-IV 1.0): one distinct value containing `WHITE`, `BLACK` or `ASIAN`; a subject with more than one distinct
//! value is inconsistent and missing. View: `PA`, `AP`, `LATERAL`/`LL`; `XTABLE LATERAL`, decubitus, obliques and
//! blank are missing.
//!
//! The CheXpert-convention helpers here (`finding`, `LabelTable`, `mimic_view`; `pub(crate)`) are shared with
//! [`crate::chexpert_plus`] and [`crate::rexgradient`].

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use crate::audit::{Audit, RowChecks};
use crate::chexpert::{LabelTable, chexpert_names, invalid_record};
use crate::output::{HarmonisedRow, sex_mf, view_position};
use crate::parse::{CsvTable, locate_table};
use crate::{SourceError, SourceOptions};

pub const DATASET: &str = "MIMIC-CXR";
pub const TABLES: [&str; 2] = [
    "mimic-cxr-2.0.0-metadata.csv.gz",
    "mimic-cxr-2.0.0-metadata.csv",
];
/// The audit column of the derived age.
pub const AGE_COLUMN: &str = "age (anchor_age + year(StudyDate) - anchor_year)";

choice! {
    /// Which copy of each image the table points at.
    pub enum MimicImage {
        /// MIMIC-CXR's DICOMs (`.dcm`).
        Dcm = "dcm",
        /// MIMIC-CXR-JPG's JPEGs (`.jpg`).
        Jpg = "jpg",
    }
}

choice! {
    /// The release's label file read when no CheXbert output is given.
    pub enum MimicLabels {
        Chexpert = "chexpert",
        Negbio = "negbio",
    }
}

choice! {
    /// What a subject whose admissions record more than one race gets.
    pub enum RaceConflict {
        /// Race missing, the images kept (ours: the paper keeps every image).
        Missing = "missing",
        /// The images rejected (chexploration's recipe drops such patients).
        Reject = "reject",
    }
}

impl MimicLabels {
    fn files(self) -> [&'static str; 2] {
        match self {
            Self::Chexpert => [
                "mimic-cxr-2.0.0-chexpert.csv.gz",
                "mimic-cxr-2.0.0-chexpert.csv",
            ],
            Self::Negbio => [
                "mimic-cxr-2.0.0-negbio.csv.gz",
                "mimic-cxr-2.0.0-negbio.csv",
            ],
        }
    }
}

/// What `radit harmonise mimic` reads and how.
#[derive(Debug, Clone, PartialEq)]
pub struct MimicOptions {
    pub source: SourceOptions,
    /// MIMIC-IV's folder (the one holding `hosp/`).
    pub mimic_iv: PathBuf,
    /// A CheXbert output CSV (`subject_id, study_id` + the 14 CheXpert names); else `release_labels`.
    pub labels: Option<PathBuf>,
    pub release_labels: MimicLabels,
    pub image: MimicImage,
    /// A subject whose admissions disagree on race.
    pub race_conflict: RaceConflict,
}

impl MimicOptions {
    pub fn new(root: &Path, mimic_iv: &Path) -> Self {
        Self {
            source: SourceOptions::new(root),
            mimic_iv: mimic_iv.to_path_buf(),
            labels: None,
            release_labels: MimicLabels::default(),
            image: MimicImage::default(),
            race_conflict: RaceConflict::default(),
        }
    }
}

/// A subject's row of `patients`, raw.
struct Patient {
    gender: String,
    anchor_age: String,
    anchor_year: String,
}

fn read_patients(path: &Path) -> Result<HashMap<String, Patient>, SourceError> {
    let mut csv = CsvTable::open(path, &["subject_id", "gender", "anchor_age", "anchor_year"])?;
    let [s, g, a, y] = csv.columns[..] else {
        unreachable!("one position per name asked for");
    };
    let mut patients = HashMap::new();
    for record in csv.reader.records() {
        let record = record.map_err(|e| invalid_record(path, e))?;
        let field = |i: usize| record.get(i).unwrap_or_default().trim().to_string();
        patients.entry(field(s)).or_insert_with(|| Patient {
            gender: field(g),
            anchor_age: field(a),
            anchor_year: field(y),
        });
    }
    Ok(patients)
}

/// The race column's name (`race`, or `ethnicity` in MIMIC-IV 1.0) and each subject's distinct non-empty values.
fn read_races(path: &Path) -> Result<(String, HashMap<String, BTreeSet<String>>), SourceError> {
    let mut csv = CsvTable::open(path, &["subject_id"])?;
    let header: Vec<String> = csv
        .reader
        .headers()
        .map(|h| h.iter().map(|c| c.trim().to_string()).collect())
        .unwrap_or_default();
    let Some((race_col, name)) = ["race", "ethnicity"]
        .iter()
        .find_map(|n| header.iter().position(|h| h == n).map(|i| (i, *n)))
    else {
        return Err(SourceError::MissingColumn {
            path: path.to_path_buf(),
            column: "race (or ethnicity)".into(),
            found: header.join(", "),
        });
    };
    let subject_col = csv.columns[0];
    let mut races: HashMap<String, BTreeSet<String>> = HashMap::new();
    for record in csv.reader.records() {
        let record = record.map_err(|e| invalid_record(path, e))?;
        let field = |i: usize| record.get(i).unwrap_or_default().trim();
        let set = races.entry(field(subject_col).to_string()).or_default();
        if !field(race_col).is_empty() {
            set.insert(field(race_col).to_string());
        }
    }
    Ok((name.to_string(), races))
}

/// `anchor_age + year(StudyDate) - anchor_year`, or why not (the text the audit shows).
fn mimic_age(p: &Patient, study_date: &str) -> Result<f64, String> {
    let date: f64 = study_date
        .parse()
        .ok()
        .filter(|d| (1e7..1e8).contains(d))
        .ok_or_else(|| format!("StudyDate `{study_date}` is not YYYYMMDD"))?;
    let number = |t: &str, name: &str| {
        t.parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| format!("{name} `{t}` is not a number"))
    };
    let (age, year) = (
        number(&p.anchor_age, "anchor_age")?,
        number(&p.anchor_year, "anchor_year")?,
    );
    Ok(age + (date / 10_000.0).floor() - year)
}

/// The subject's race and the raw text the audit shows.
fn mimic_race(values: Option<&BTreeSet<String>>) -> (String, Option<&'static str>) {
    let values: Vec<&str> = values.into_iter().flatten().map(String::as_str).collect();
    match values[..] {
        [] => (String::new(), None),
        [one] => {
            let race = [("WHITE", "White"), ("BLACK", "Black"), ("ASIAN", "Asian")]
                .into_iter()
                .find_map(|(k, v)| one.contains(k).then_some(v));
            (one.to_string(), race)
        }
        _ => (format!("inconsistent: {}", values.join(" | ")), None),
    }
}

/// Harmonises the release under `opts.source.root` with MIMIC-IV under `opts.mimic_iv`.
pub fn harmonise(mimic: &MimicOptions) -> Result<(Vec<HarmonisedRow>, Audit), SourceError> {
    let opts = &mimic.source;
    let table = locate_table(&opts.root, opts.table.as_deref(), &TABLES)?;
    let labels_path = match &mimic.labels {
        Some(p) => p.clone(),
        None => locate_table(&opts.root, None, &mimic.release_labels.files())?,
    };
    let hosp = mimic.mimic_iv.join("hosp");
    let patients_path = locate_table(&hosp, None, &["patients.csv.gz", "patients.csv"])?;
    let admissions_path = locate_table(&hosp, None, &["admissions.csv.gz", "admissions.csv"])?;
    let mut audit = Audit::new(DATASET);
    for p in [&table, &labels_path, &patients_path, &admissions_path] {
        audit.inputs.push(p.display().to_string());
    }
    audit.label_map = format!(
        "(none: the CheXpert-convention labels of {})",
        labels_path.display()
    );
    let names = chexpert_names();
    let mut labels = LabelTable::read(
        &labels_path,
        &["subject_id", "study_id"],
        &names,
        "study",
        &mut audit,
    )?;
    let patients = read_patients(&patients_path)?;
    let (race_column, races) = read_races(&admissions_path)?;
    let mut csv = CsvTable::open(
        &table,
        &[
            "dicom_id",
            "subject_id",
            "study_id",
            "ViewPosition",
            "StudyDate",
        ],
    )?;
    let [id_col, subject_col, study_col, view_col, date_col] = csv.columns[..] else {
        unreachable!("one position per name asked for");
    };
    let ext = match mimic.image {
        MimicImage::Dcm => "dcm",
        MimicImage::Jpg => "jpg",
    };
    let mut checks = RowChecks::new(&table, ("dicom_id", id_col), ("subject_id", subject_col));
    let mut rows = Vec::new();
    for record in csv.reader.records() {
        let Some(row) = checks.accept(&mut audit, record) else {
            continue;
        };
        let (line, field) = (row.line, |i: usize| row.field(i));
        let (id, subject, study) = (field(id_col), field(subject_col), field(study_col));
        if study.is_empty() {
            audit.reject(&table, line, id, "empty study_id", "empty study_id".into());
            continue;
        }
        let prefix = subject.get(..2).unwrap_or(subject);
        let path = format!("files/p{prefix}/p{subject}/s{study}/{id}.{ext}");
        if let Some(reason) = opts.missing_image(&path) {
            audit.reject(&table, line, id, "image file not found", reason);
            continue;
        }
        let patient = patients.get(subject);
        let date = field(date_col);
        let age = match patient {
            None => audit.age(AGE_COLUMN, "(subject not in patients)", Ok(None), opts),
            // The histogram shows the computed age, or why there is none.
            Some(p) => match mimic_age(p, date) {
                Ok(a) => audit.age(AGE_COLUMN, &format!("{a}"), Ok(Some(a)), opts),
                Err(why) => audit.age(AGE_COLUMN, &why, Err(why.clone()), opts),
            },
        };
        let raw_sex = patient.map_or("(subject not in patients)", |p| p.gender.as_str());
        let sex = audit.mapped("gender", raw_sex, sex_mf(raw_sex));
        let (raw_race, race) = mimic_race(races.get(subject));
        if mimic.race_conflict == RaceConflict::Reject && raw_race.starts_with("inconsistent") {
            let reason = format!("subject {subject}: {raw_race}");
            audit.reject(&table, line, id, "inconsistent race", reason);
            continue;
        }
        let race = audit.mapped(&race_column, &raw_race, race);
        let raw_view = field(view_col);
        let view = audit.mapped("ViewPosition", raw_view, view_position(raw_view));
        let findings = labels.findings(&format!("{subject}/{study}"), &names, &mut audit);
        let mut row = HarmonisedRow::native(DATASET, id, subject, path);
        (row.age, row.sex, row.race, row.view, row.findings) = (age, sex, race, view, findings);
        audit.written(&mut rows, row);
    }
    labels.count_unused(&mut audit);
    Ok((rows, audit))
}

/// The fixture's images: dicom_id, subject_id, study_id, ViewPosition, StudyDate.
#[rustfmt::skip]
const FIXTURE_IMAGES: [(&str, &str, &str, &str, &str); 8] = [
    ("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "10000032", "50414267", "PA", "21800506"),
    ("174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "10000032", "50414267", "LATERAL", "21800506"),
    ("2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "10000032", "50414267", "", "21800506"),
    ("68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714", "10000764", "57375967", "AP", "21321015"),
    ("4904ef8e-1e18f54b-1bbd9b0c-3b2a6c1d-9e1e4f6b", "10000898", "50771383", "XTABLE LATERAL", "21540316"),
    ("5a4b0d1e-3c2f7a6b-8d9e0f1a-2b3c4d5e-6f7a8b9c", "10001217", "58913004", "LL", "21571211"),
    ("6b5c1e2f-4d3a8b7c-9eaf1b2c-3d4e5f6a-7b8c9dae", "10001217", "52067803", "AP", "21590101"),
    ("7c6d2f3a-5e4b9c8d-afb02c3d-4e5f6a7b-8c9daebf", "10002428", "59258774", "AP", "21560520"),
];

/// Writes a small MIMIC-CXR release under `root` and MIMIC-IV tables under `mimic_iv`, in the native layout (gzipped
/// tables, DICOMs at their paths): a study with three images and one label row (one image with a blank
/// ViewPosition), a subject absent from `patients`, a subject with `WHITE` and `BLACK/AFRICAN AMERICAN` admissions,
/// `XTABLE LATERAL` and `LL`, a study with no label row and a label row for a study with no image.
pub fn write_fixture(root: &Path, mimic_iv: &Path) -> std::io::Result<()> {
    use crate::fixture_files::{dicom, gzip, write};
    let mut metadata = String::from(
        "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,\
         StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,\
         PatientOrientationCodeSequence_CodeMeaning\n",
    );
    for (i, (id, subject, study, view, date)) in FIXTURE_IMAGES.into_iter().enumerate() {
        let code = match view {
            "PA" => "postero-anterior",
            "AP" => "antero-posterior",
            "LATERAL" => "lateral",
            "LL" => "left lateral",
            _ => "",
        };
        metadata.push_str(&format!(
            "{id},{subject},{study},CHEST (PA AND LAT),{view},20,24,{date},{}.531,CHEST (PA AND LAT),{code},Erect\n",
            120_000 + i * 1111
        ));
        let prefix = &subject[..2];
        let path = format!("files/p{prefix}/p{subject}/s{study}/{id}.dcm");
        dicom(&root.join(path), 30 + i as u16, |f| {
            f.view_position = (!view.is_empty()).then(|| view.to_string());
        })?;
    }
    write(&root.join(TABLES[0]), &gzip(&metadata))?;
    let header = chexpert_names();
    let mut labels = format!("subject_id,study_id,{}\n", header.join(","));
    //          Atel Card Cons Edema ECM Frac LL LO NoF PlEff PlOth Pneu Ptx SD
    for row in [
        "10000032,50414267,,1.0,,-1.0,,,,,,0.0,,,,1.0",
        "10000764,57375967,,,,,,,,,1.0,,,,,",
        "10001217,58913004,1.0,0.0,-1.0,,,,,1.0,0.0,1.0,,0.0,0.0,",
        "10001217,52067803,,,,,,1,,,0,,,,,",
        "10002428,59258774,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0,0.0,0.0,0.0,0.0,0.0",
        "10000032,59999999,,,,,,,,,1.0,,,,,",
    ] {
        labels.push_str(row);
        labels.push('\n');
    }
    write(&root.join(MimicLabels::Chexpert.files()[0]), &gzip(&labels))?;
    let patients = "subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod\n\
        10000032,F,52,2180,2014 - 2016,2180-09-09\n\
        10000764,M,86,2132,2014 - 2016,\n\
        10001217,F,55,2157,2011 - 2013,\n\
        10002428,F,80,2155,2011 - 2013,\n";
    let admissions = "subject_id,hadm_id,admittime,dischtime,admission_type,insurance,language,marital_status,race\n\
        10000032,22595853,2180-05-06 22:23:00,2180-05-07 17:15:00,URGENT,Other,ENGLISH,WIDOWED,WHITE\n\
        10000032,22841357,2180-06-26 18:27:00,2180-06-27 18:49:00,EW EMER.,Medicaid,ENGLISH,WIDOWED,WHITE\n\
        10000764,27897940,2132-10-14 23:31:00,2132-10-19 16:30:00,OBSERVATION ADMIT,Other,?,,WHITE\n\
        10000764,20385771,2133-01-03 10:00:00,2133-01-05 12:00:00,EW EMER.,Other,ENGLISH,,BLACK/AFRICAN AMERICAN\n\
        10001217,24597018,2157-11-18 22:56:00,2157-11-25 18:00:00,EW EMER.,Other,?,MARRIED,BLACK/CAPE VERDEAN\n\
        10002428,28662225,2156-02-24 16:58:00,2156-03-05 14:37:00,EW EMER.,Medicare,ENGLISH,WIDOWED,ASIAN - CHINESE\n";
    let hosp = mimic_iv.join("hosp");
    write(&hosp.join("patients.csv.gz"), &gzip(patients))?;
    write(&hosp.join("admissions.csv.gz"), &gzip(admissions))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn races_and_views() {
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(
            mimic_race(Some(&set(&["WHITE - RUSSIAN"]))).1,
            Some("White")
        );
        assert_eq!(mimic_race(Some(&set(&["ASIAN - KOREAN"]))).1, Some("Asian"));
        assert_eq!(mimic_race(Some(&set(&["UNABLE TO OBTAIN"]))).1, None);
        let (raw, race) = mimic_race(Some(&set(&["WHITE", "BLACK/AFRICAN"])));
        assert_eq!(
            (raw.as_str(), race),
            ("inconsistent: BLACK/AFRICAN | WHITE", None)
        );
        assert_eq!(mimic_race(None), (String::new(), None));
        assert_eq!(view_position("LL"), Some("Lateral"));
        assert_eq!(view_position("XTABLE LATERAL"), None);
        assert_eq!(view_position(""), None);
    }

    #[test]
    fn ages_from_the_anchor() {
        let p = Patient {
            gender: "F".into(),
            anchor_age: "52".into(),
            anchor_year: "2180".into(),
        };
        assert_eq!(mimic_age(&p, "21820101"), Ok(54.0));
        assert_eq!(mimic_age(&p, "21800506.0"), Ok(52.0));
        assert!(
            mimic_age(&p, "2180-05-06")
                .unwrap_err()
                .contains("StudyDate")
        );
    }
}
