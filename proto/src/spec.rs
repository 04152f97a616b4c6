//! Names shared by every process of a run. Each parses from and prints to the
//! spelling used on the command line, so that errors can list the valid choices.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A name that is not one of the known choices.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown {what} '{got}': expected one of {}", .choices.join(", "))]
pub struct ParseSpecError {
    what: &'static str,
    got: String,
    choices: Vec<&'static str>,
}

macro_rules! named_enum {
    ($(#[$m:meta])* $name:ident, $what:literal { $($(#[$vm:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name { $($(#[$vm])* #[serde(rename = $text)] $variant),+ }

        impl $name {
            /// Every choice, in the order the help text lists them.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The command-line spelling.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }

        impl FromStr for $name {
            type Err = ParseSpecError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let lower = s.to_ascii_lowercase();
                $(if lower == $text { return Ok($name::$variant); })+
                Err(ParseSpecError { what: $what, got: s.to_string(), choices: vec![$($text),+] })
            }
        }
    };
}

named_enum!(
    /// The network architectures of the model zoo.
    ModelKind, "model" {
        /// The PyTorch MNIST example network (DESIGN.md).
        Cnn => "cnn",
        Vgg11 => "vgg11",
        Squeezenet1_1 => "squeezenet1_1",
        MobilenetV2 => "mobilenet_v2",
        Densenet121 => "densenet121",
        Resnet18 => "resnet18",
    }
);

named_enum!(
    /// The data sets the readers understand.
    DatasetKind, "dataset" {
        Mnist => "mnist",
        FashionMnist => "fashion-mnist",
        Cifar10 => "cifar10",
    }
);

named_enum!(
    /// How pixels become model inputs.
    Normalization, "normalization" {
        /// (x/255 - mean) / std with the data set's per-channel constants.
        MeanStd => "mean-std",
        /// x/255, into [0, 1].
        MinMax => "min-max",
        /// Each image to zero mean and unit variance on its own.
        Standardize => "standardize",
    }
);

named_enum!(
    /// The update rule applied to the averaged gradient.
    OptimizerKind, "optimizer" {
        Sgd => "sgd",
        Adam => "adam",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print_round_trip() {
        for m in ModelKind::ALL {
            assert_eq!(m.as_str().parse::<ModelKind>().unwrap(), *m);
            let json = serde_json::to_string(m).unwrap();
            assert_eq!(json, format!("\"{}\"", m.as_str()));
        }
        assert_eq!("Fashion-MNIST".parse::<DatasetKind>().unwrap(), DatasetKind::FashionMnist);
    }

    #[test]
    fn unknown_name_lists_choices() {
        let e = "lenet".parse::<ModelKind>().unwrap_err().to_string();
        assert_eq!(
            e,
            "unknown model 'lenet': expected one of cnn, vgg11, squeezenet1_1, mobilenet_v2, densenet121, resnet18"
        );
    }
}
