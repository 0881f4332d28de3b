//! Prints the CRDs (the controller's `crds` command does the same).
fn main() -> Result<(), serde_yaml::Error> {
    #[allow(clippy::print_stdout)]
    {
        print!("{}", planproxy_crds::crds_yaml()?);
    }
    Ok(())
}
