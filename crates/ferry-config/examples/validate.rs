//! `cargo run -p ferry-config --example validate -- FILE...`: prints each file's errors.
fn main() {
    let mut failed = false;
    for arg in std::env::args().skip(1) {
        match ferry_config::load_file(std::path::Path::new(&arg)) {
            Ok(_) => println!("{arg}: OK"),
            Err(errors) => {
                failed = true;
                println!("{arg}:\n{errors}");
            }
        }
    }
    std::process::exit(i32::from(failed));
}
