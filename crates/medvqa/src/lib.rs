//! Med-R1's data: OmniMedVQA and Med-R1 records, splits and filters, Med-R1's prompt
//! templates, and a deterministic synthetic med-VQA set for runs without any download.

pub mod convert;
pub mod error;
pub mod load;
pub mod record;
pub mod rng;
pub mod select;
pub mod summary;
pub mod synth;
pub mod taxonomy;
pub mod template;

pub use error::DataError;
pub use load::{load_file, load_paths, LoadOptions, Loaded, Skipped};
pub use record::VqaRecord;
pub use select::{balanced_sample, split_train_test, Filter};
pub use summary::Summary;
pub use taxonomy::{Modality, QuestionType};
pub use template::PromptTemplate;
